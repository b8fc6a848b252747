"""The agent's calls to the leader: heartbeats, over mutual TLS to the leader's address.

    link = LeaderLink(cfg, identity, trust, journal, failures)
    await link.beat()     # one heartbeat now (the trust's refresh when an epoch is unknown)
    await link.run()      # every heartbeat_interval, until cancelled

The channel's TLS target name is the leader's internal name (``tlsroll.spiffe.leader_host``):
only a certificate that the CA issued to the leader passes, not one of a node that happens to
hold the leader's address. Each heartbeat reports the agent's version, the highest epoch its
journal has seen and the number of its revocation list, and carries the failed bootstrap
passwords since the last one; the reply announces the leader's epoch and, when newer, the
revocation list (both go to ``nodeagent.trust``).

Heartbeats go over one long-lived ``Leader.Heartbeats`` stream (a unary call costs the leader
several times the CPU of a message on an open stream). The agent builds its report every
interval but sends it only when it says something new (``report_key``: not the times and counts
that move with every request a workstation makes, nor the count of wrong passwords at the
managed server's login as it grows: a guessing client) or the leader's renewal bound
(``renew_seconds`` in its reply) would pass before the next one: between messages the
connection's keepalive tells the leader the agent is alive, and each message costs the leader
about a millisecond. A reader task takes the leader's answers and its news (a new epoch or
revocation list, sent unasked). A leader that gives no renewal bound (older) gets a message
every interval. A stream that the leader ends or that breaks (the leader stopped or restarted,
ended a stream that fell behind, the connection broke) is noticed by its reader task, and a new
one is opened at once, after a short random pause (``reconnect_pause``: up to a second, a
quarter interval at most, so that the agents of a restarted leader do not all come back in the
same millisecond) as soon as the channel is connected again: the leader counts a stream that
ended without ``closing`` alive only half an interval more, and the node showed offline until
the agent's next heartbeat (and commands waited for it). A stream that ends again soon after it
opened (``LASTED_SECONDS``) doubles the pause, up to the interval: a leader that keeps ending
streams hears from the agent no more often than before, and one that is away is not called
until the channel connects (gRPC's reconnect backoff); one that refuses
the certificate (or has too many of the node's streams) hears from it at the next heartbeat, as
before. A stream that gives no answer within the interval is dropped, and the next heartbeat
opens a new one on the usual schedule. A message asks for an answer when the leader has said
nothing on the stream for ``UNHEARD_BOUNDS`` renewal bounds (``wants_answer``), and is not
waited for: a leader not heard from within a renewal bound after it is taken for gone. A leader
whose Python stopped while its kernel and gRPC core kept the connection up is thus noticed
within three bounds (about 60 s at 5 s); one slow for a moment is not. A leader older than
that RPC answers UNIMPLEMENTED: the agent then sends unary ``Heartbeat`` calls, and tries the
stream again once that leader has been unreachable or after ``STREAM_RETRY_BEATS`` calls (it
may have been upgraded).

The link also carries the agent's certificate renewal (``renew``; ``nodeagent.renewal``) and
the renewal's status in each heartbeat; ``use`` reconnects it with the renewed certificate
(between two calls: a call in flight finishes on the old channel first).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import functools
import hashlib
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from nodeagent import nodefiles
from nodeagent.config import AgentConfig
from nodeagent.failure_log import FailureCount, FailureLog
from nodeagent.identity import Identity
from nodeagent.journal import Journal
from nodeagent.trust import LeaderTrust
from tlsroll import __version__, features, logs, rpc, spiffe, wire
from tlsroll.errors import (
    NotRegularFile,
    ShuttingDown,
    TerminalError,
    TransientError,
    os_error_text,
)
from tlsroll.rpc import NO_BDP_PROBE, hostport, reconnect_options
from tlsroll.v1 import agent_pb2, leader_pb2, leader_pb2_grpc

log = logs.get_logger(__name__)
SERVER_VIEW_SECONDS = 2.0  # a heartbeat does not wait longer for the server's status
# Of that, how long the view waits for a restart the agent's own switch makes
# (``NodeAgentService.server_view``): the rest is for the server's status once it ended.
RESTART_VIEW_WAIT = SERVER_VIEW_SECONDS - 0.5
# With a leader that has no heartbeat stream, the stream is tried again after this many unary
# heartbeats (and after the leader was unreachable): an upgrade may have brought it.
STREAM_RETRY_BEATS = 60
# Intervals the agent's kernel waits for the leader to acknowledge what the agent sent (a
# heartbeat message, a PING) before it drops the connection (``leader_channel_options``).
UNACKED_HEARTBEATS = 2
LEADER_INTERVAL_MAX = nodefiles.LEADER_INTERVAL_MAX
# A renewal-mode message asks for an answer when the leader has said nothing on the stream for
# about this many renewal bounds (``wants_answer``): how the agent notices a leader whose Python
# stopped. 1 (every message at the bound asks) noticed it within 25 s at 5 s, for about 0.1 ms
# more leader CPU per agent and interval at 50 agents (0.4 ms per message answered).
UNHEARD_BOUNDS = 2
# Planning questions (``HeartbeatResponse.check``) the agent answers at once on one stream; one
# more is answered at once with ``BUSY`` (the leader then asks over its channel in the time its
# deadline has left: ``leader.service.LeaderService.ask_check``), up to as many again; past
# that it is dropped (the leader's deadline runs out: unreachable, "no answer within").
QUESTIONS_AT_ONCE = 8
BUSY = grpc.StatusCode.RESOURCE_EXHAUSTED  # ``CheckAnswer.refused_code``: no room for it now
# An answer not made within this is given up (its checks cancelled, as a Check call's are at
# its deadline): the leader's deadline for it (``leader.observe.OBSERVE_TIMEOUT``, 5 s, as for
# a Check over the channel), so that a check that hangs (a driver's status command) holds one
# of the places above no longer than the leader counts the question as waiting
# (``leader.service.QUESTIONS_PER_STREAM``, freed at that deadline).
ANSWER_SECONDS = 5.0
# Stages no transaction began that a heartbeat names at most (``unswitched_stages``), the
# rollout whose way back the agent keeps included (``Journal.heartbeat_facts``); as a rule
# there are two at most (a rollout's key ends every earlier such stage: ``Journal.record_csr``;
# the newest switch's way back is the only one kept).
HELD_CRL_MAX = 768 * 1024
"""The largest revocation list (PEM) the agent sends a leader that asks for it (``wants_crl``):
the leader takes messages of at most 1 MiB (``leader.service.MAX_AGENT_MESSAGE``), and the rest
of a heartbeat may take up to 200 KiB. A larger one is not sent (said once per list number,
``crl.held_too_large``): the leader then sends its own list after its patience
(``leader.service.crl_patience``)."""

STAGES_REPORTED = 64
# What a heartbeat says of the agent's own store at most (``HeartbeatRequest.store_trouble``):
# texts, and characters each.
STORE_TROUBLE_MAX = 4
STORE_TROUBLE_CHARS = 600
# The figures in a store trouble's words (the free space it names, with its unit): not news
# on their own (``report_key``).
_FIGURES = re.compile(r"\d+(?:\.\d+)?(?: [KMGT]iB)?")
# A store trouble's text as sent is at most this long, its figures in full (``cut_trouble``).
STORE_TROUBLE_SENT = 2 * STORE_TROUBLE_CHARS


def cut_trouble(text: str) -> str:
    """``text`` (a store trouble) cut where its figures masked (``report_key``) reach
    ``STORE_TROUBLE_CHARS``, never inside a figure, and at ``STORE_TROUBLE_SENT`` in any case.
    Cut before the mask, a long path let a figure's length move the cut, and its free space
    changing became news (review of s74 agenttrouble, L4). The leader keeps its own
    characters (``leader.service.STORE_TROUBLE_CHARS``)."""
    kept: list[str] = []
    room, at = STORE_TROUBLE_CHARS, 0
    for figure in _FIGURES.finditer(text):
        plain = text[at : figure.start()]
        if len(plain) >= room:
            break
        kept.append(plain)
        room -= len(plain)
        if room < 1:
            break
        kept.append(figure.group())
        room -= 1  # (masked, it is one character: ``#``)
        at = figure.end()
    else:
        plain = text[at:]
    if room > 0:
        kept.append(plain[:room])
    return "".join(kept)[:STORE_TROUBLE_SENT]


CLOSE_SECONDS = 2.0  # an agent closing its stream waits this long at most for the leader's end
RECONNECT_SECONDS = 1.0  # a stream that ended by itself is opened again within this (jittered)
# A stream that ended sooner than this (or an interval, if shorter) after it opened is taken
# for one of a leader that keeps ending them: the pause before the next grows.
LASTED_SECONDS = 10.0
# Ends after which the agent waits for its next heartbeat, as before: the leader refused the
# certificate, had too many of the node's streams, or has no stream (unary from then on).
NOT_AT_ONCE = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)

GRPC_LOST_STATUS = "Internal error from Core"
"""The details of the INTERNAL status gRPC's asyncio client gives a stream message it could not
write because the call had ended meanwhile (the leader ended it, or the connection broke): the
leader's own status is lost, replaced on the call by this one (grpcio 1.85's
``_StreamRequestMixin._write``: grpc/grpc#36066), and the stream's reader may read it too.
Seen as a leader refuses a new stream while its first message goes (a stopping leader's
UNAVAILABLE, on a loaded machine: review of session 65). The leader's own INTERNAL says
``tlsroll.rpc``'s words, never these."""
LOST_STATUS = "STATUS_LOST"  # what the log says of such an end, in place of a status code
LOST_DETAIL = (
    "the stream ended as a message went (the leader ended it or the connection broke); "
    "gRPC lost the leader's status"
)
OUTAGE_WARN_SECONDS = 60.0
"""How long heartbeats may fail in a row, the leader away or slow (``PASSING``), before the
agent warns (``heartbeat.still_failing``, once per outage, at the first beat that fails this
long after the first did): a leader's planned restart (an upgrade, ``systemctl restart
tlsroll-leader``) is over well within it, and its agents then log only ``heartbeat.failed`` at
info (before, each agent warned: 50 warnings in the journal for a 50-node upgrade, none of
them anything for the admin to do)."""
PASSING = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", LOST_STATUS})
"""The failures of a beat that say the leader is away, restarting or slow, as in a planned
restart (a stopping leader ends the streams UNAVAILABLE, "the leader is stopping"): logged at
info until they last ``OUTAGE_WARN_SECONDS``. Any other (a refusal: a certificate the leader
does not take, an error of the leader's) is a warning at once."""
OUTAGE_HINT = (
    "check that tlsroll-leader runs on the leader (systemctl status tlsroll-leader) and that "
    "this node reaches the leader's address and control port; the node shows offline meanwhile"
)
CRASH_HINT = (
    "a fault in the agent's heartbeat code, not the leader's: the next heartbeat comes as "
    "usual; if this repeats, restart the agent (systemctl restart tlsroll-agent) and report it"
)


class StreamEnded(TransientError, TimeoutError):
    """``LeaderLink._exchange``: the heartbeat stream ended (the leader ended it, the connection
    broke, or it never connected) as a message went, seen by the write (gRPC's
    ``InvalidStateError``: the call was done before the stream's reader took note), not by an
    ``AioRpcError``; ``code``: its status, or ``LOST_STATUS``. A TimeoutError as before (the
    heartbeat's callers take it as any failure), and the project's TransientError (every error
    the project defines is one of its two kinds); ``LeaderLink._exchange_by_pin`` tells it
    from a leader that did not answer in time."""

    def __init__(self, message: str, code: grpc.StatusCode | str) -> None:
        super().__init__(message)
        self.code = code


def unreached(exc: BaseException) -> bool:
    """Whether a heartbeat that failed with ``exc`` may not have reached the leader it dialed:
    UNAVAILABLE (the handshake failed, as with a certificate that lacks the name dialed, or the
    leader is away or restarting), however it surfaced (``AioRpcError``, or ``StreamEnded``:
    on a loaded machine the write saw the call done before its reader did), or a status gRPC
    lost (``status_lost``: the stream ended as the message went). Not a refusal of the
    leader's, nor a leader that did not answer in time (a plain TimeoutError: the stream was
    up)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() == grpc.StatusCode.UNAVAILABLE or status_lost(exc)
    return isinstance(exc, StreamEnded) and exc.code in (grpc.StatusCode.UNAVAILABLE, LOST_STATUS)


def status_lost(exc: BaseException | None) -> bool:
    """Whether ``exc`` is gRPC's own INTERNAL for a stream write the call's end cut short
    (``GRPC_LOST_STATUS``), not a status the leader sent."""
    return (
        isinstance(exc, grpc.aio.AioRpcError)
        and exc.code() == grpc.StatusCode.INTERNAL
        and exc.details() == GRPC_LOST_STATUS
    )


def wants_answer(heard: float, now: float, interval: float, renew: float) -> bool:
    """Whether a renewal-mode message sent at ``now`` asks for an answer, the leader's last
    reply of any kind (an answer, news, a question) on the stream having come at ``heard``,
    its renewal bound being ``renew``: when that was ``UNHEARD_BOUNDS`` bounds ago, less half
    an interval (a message at the bound leaves at the first beat that would otherwise pass
    it). A leader whose Python stopped (its event loop blocked, or the process stopped) while
    its kernel still acknowledges what the agent writes, and, unless the whole process
    stopped, its gRPC core still answers PINGs, left the stream up, and a routine message
    waits for nothing: the agent noticed it only when the stream's flow-control window filled
    (many minutes) or at its PING then every 300 s (audit 2 of session 33,
    L3). With no news meanwhile every second message at the bound asks, without waiting for
    the answer; when the leader has said nothing by the next message at the bound, the stream
    is dropped (``heartbeat.failed``, logged once): a leader that stopped is noticed within
    about 3 bounds (60 s at 5 s, 12 s at 1 s); each later beat opens a new stream, whose
    first message asks, until the leader answers again. (Waiting an interval for the answer
    dropped the streams of a leader whose loop or store was busy for longer than that:
    review 1 of session 34, L1.) The cost is the leader's answer, a small write on a message
    it reads anyway, one per 40 s per agent (news spares it): at 50 agents within the spread of two
    A/B pairs of leader CPU per agent and interval (0.47 against 0.43, and 0.47 against
    0.53 ms), its event loop's context switches per message 1.43-1.45 before, 2.07-2.23."""
    return now - heard >= UNHEARD_BOUNDS * renew - interval / 2


def reconnect_pause(
    attempt: int, interval: float, draw: Callable[[], float] = random.random
) -> float | None:
    """How long an agent whose stream ended by itself waits before it opens a new one (then as
    soon as the channel is connected: ``LeaderLink._leader_reachable``): a random part
    (``draw``) of ``RECONNECT_SECONDS`` or a quarter interval if less, doubled for each stream
    in a row that ended soon after opening (``attempt``; 0 after one that lasted
    ``LASTED_SECONDS`` or an interval) but the first (as a rule one opened just before the
    channel saw a stopping leader gone). None once that reaches the interval: the usual
    heartbeat then, so that a leader that keeps ending streams is called no more often than
    before."""
    bound = min(RECONNECT_SECONDS, interval / 4) * 2 ** max(0, min(attempt, 32) - 1)
    return None if bound >= interval else bound * draw()


def failure_messages(sent: list[FailureCount]) -> list[leader_pb2.BootstrapFailure]:
    """What the heartbeat carries about failed bootstrap passwords."""
    messages = []
    for f in sent:
        last = Timestamp()
        last.FromDatetime(f.last_at)
        messages.append(
            leader_pb2.BootstrapFailure(
                source=f.source[:64], workstation=f.workstation[:63], count=f.count, last_at=last
            )
        )
    return messages


def _read_pin(data_dir: Path) -> tuple[int | None, bool]:
    """``nodefiles.read_leader_pin``; one that cannot be read is taken as a leader that
    announced serials, none known (said, with the way on): a generic-name link is then not
    trusted until the leader names its serial again, and the record is written anew then
    (``_learn``). Not as no record (an earlier leader's link trusted): a holder of a revoked
    leader key on the path would be obeyed until the leader was heard. A leader of an earlier
    release never names one: the admin removes the record, as for a downgrade (s69)."""
    try:
        return nodefiles.read_leader_pin(data_dir)
    except (OSError, NotRegularFile, ValueError) as exc:
        error = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
        path = nodefiles.leader_pin_path(data_dir)
        log.warning(
            "leader.serial_unreadable",
            error=error[:200],
            detail="taken as a leader that named its serial, none known: a link by the "
            "leader's generic name is not obeyed until the leader names it (then written "
            f"anew); if the leader is of a release that names none, remove {path} and "
            "restart the agent",
        )
        return None, True


class RenewalState(Protocol):
    """What a heartbeat says about renewal (``nodeagent.renewal.Status``)."""

    due_at: dt.datetime | None
    failing_since: dt.datetime | None
    error: str


class RenewalRefused(TerminalError):
    """The leader did not renew the agent's certificate; the message says why."""


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ts(when: dt.datetime | None) -> Timestamp | None:
    if when is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def live_server(view: agent_pb2.ServerView) -> leader_pb2.LiveServer:
    """What a heartbeat says about the managed server: the status view, less the certificate
    and verifier, with who the server has seen lately (the driver caches that list, so a
    heartbeat does not run a command or read a log each time), and the wrong passwords at its
    own login (the count the server keeps across its restarts: the admin sees someone guessing
    the client password); without a client list where the view has none
    (``NodeAgentService.server_view``'s "restarting"). The certificate it serves https with
    goes as its fingerprint only (``served_fingerprint``): the leader's views of what nodes
    serve go by it (review rvc of s66-misc, L2)."""
    live = leader_pb2.LiveServer(
        driver=view.driver,
        healthy=view.healthy,
        frozen=view.frozen,
        schemes=list(view.schemes),
        detail=view.detail[:200],
        login_failures=view.login_failures,
        cert_fingerprint=served_fingerprint(view.cert_pem) if view.healthy else "",
    )
    # None said (a restart of the agent's own under way): the leader keeps what it has.
    if view.HasField("clients"):
        live.clients.CopyFrom(view.clients)
    if view.HasField("last_login_failure_at"):
        live.last_login_failure_at.CopyFrom(view.last_login_failure_at)
    return live


_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"


@functools.lru_cache(maxsize=4)
def served_fingerprint(cert_pem: bytes) -> str:
    """``sha256:`` and the hex SHA-256 of the DER of the first certificate of ``cert_pem`` (the
    server's, before its chain), as ``tlsroll.pki.fingerprint`` has it; "" for none or one
    that is no PEM. Hashed from the PEM's base64 without a parse of the certificate (every
    heartbeat reads the server's view; the same few are cached)."""
    start = cert_pem.find(_PEM_BEGIN)
    end = cert_pem.find(_PEM_END, start + 1)
    if start < 0 or end < 0:
        return ""
    try:
        der = base64.b64decode(
            b"".join(cert_pem[start + len(_PEM_BEGIN) : end].split()), validate=True
        )
    except (binascii.Error, ValueError):
        return ""
    return "sha256:" + hashlib.sha256(der).hexdigest() if der else ""


def withhold(request: leader_pb2.HeartbeatRequest) -> None:
    """Leave out of a heartbeat on a link the agent does not trust (the generic name's, once a
    leader named its serial: ``LeaderLink._trusts``) what a holder of a revoked leader key
    answering there should not learn and what its answer must not settle: the failed bootstrap
    passwords (their sources and the workstation names claimed; taken as reported on its
    answer, they never reached the leader: session 69) and who the managed server has seen
    (``clients``: without it the leader keeps what it has). The rest goes: what the leader
    records of the node from every message (the server's state, the renewal's: left out, the
    leader would take it as said; an earlier leader too), and what a leader answering there
    needs (its serial named, the agent's list and epoch: a restored leader relearns the node).
    The report stays pending and goes with the next message by the serial."""
    request.ClearField("bootstrap_failures")
    request.failures_report = 0
    if request.HasField("server"):
        request.server.ClearField("clients")


Beats = grpc.aio.StreamStreamCall[leader_pb2.HeartbeatRequest, leader_pb2.HeartbeatResponse]
# The agent's answer to the leader's planning question (``NodeAgentService.answer_check``).
Answer = Callable[[leader_pb2.CheckQuestion], Awaitable[leader_pb2.CheckAnswer]]


def report_key(request: leader_pb2.HeartbeatRequest) -> bytes:
    """What of a heartbeat makes it worth a message before the renewal bound: all of it but
    when it was sent, how it is sent (its ``seq``, ``renews``, ``wants_answer``: a new
    stream's first message asks for an answer, and its next beat was sent for that alone),
    the times and counts of the clients seen (they move with every request a workstation
    makes; the leader stores them only now and then anyway), and the revocation list's
    number: the agent's number changes only when it took a list the leader sent it, and the
    leader counts the agent as holding a list once it has written it
    (``leader.service._Beats.send``). Each of the leader's rounds of news (a rollout revokes
    each done node's superseded certificate: a round every ``CRL_NEWS_SECONDS``) brought a
    message back from every agent, which told the leader nothing and cost it about a
    millisecond each (issue 15). The next message (at the bound at the latest) carries the
    number. Nor the stages no transaction began (``unswitched_stages``): a rollout's key and
    its switch each changed them, a message more per node and rollout; the leader hears of a
    stage left behind at the bound at the latest, which is soon enough for files that stayed
    for good before. Nor how many wrong passwords the managed server has counted at its login
    and when the latest was, only whether there are any: someone guessing the client password
    made a message each beat (and a leader log line each), a guessing client drove the agent's
    traffic to the leader (review of s49, 2). The first is news at once; the count as it grows
    goes with the next message, at the bound at the latest (every message carries the count
    now, so the last one is never lost)."""
    key = leader_pb2.HeartbeatRequest()
    key.CopyFrom(request)
    key.ClearField("sent_at")
    key.ClearField("seq")
    key.ClearField("renews")
    key.ClearField("wants_answer")
    key.ClearField("crl_number")
    key.ClearField("held_crl_pem")  # (the leader asked for it: sent then, whatever else changed)
    # Goes with the next message, at the bound at the latest (the leader's answer:
    # ``leader.service.LeaderService._look_at_stages``): a stage made or switched would
    # otherwise cost a message per node and rollout.
    key.ClearField("unswitched_stages")
    # Whether the agent's store is in trouble and which, not how much free space is left (a
    # filling disk changed it at every beat: session 74).
    key.store_trouble[:] = [_FIGURES.sub("#", t) for t in key.store_trouble]
    # Whether the server counts wrong passwords, not how many nor when the latest was.
    if key.HasField("server"):
        key.server.login_failures = min(key.server.login_failures, 1)
        key.server.ClearField("last_login_failure_at")
    # Who used http again after first using https (``tlsroll.wire.back_on_http``): the times
    # go, but a client's going back to http is news, once per revert, not per request.
    back = sorted(wire.back_on_http(key.server.clients.clients))
    for client in key.server.clients.clients:
        client.ClearField("first_seen")
        client.ClearField("last_seen")
        client.ClearField("requests")
    return key.SerializeToString(deterministic=True) + "\0".join(["", *back]).encode()


async def _status(stream: _Stream) -> grpc.StatusCode | None:
    """How ``stream`` ended (None: it has not, or not with a status)."""
    if isinstance(stream.ended, grpc.aio.AioRpcError):
        return stream.ended.code()
    return await stream.call.code() if stream.call.done() else None


def leader_channel_options(
    heartbeat_interval: int, leader_interval: int | None = None
) -> list[tuple[str, int]]:
    """The agent's channel options for the leader: how it notices a leader that vanished
    without closing its connection (its host lost power, a cable pulled). The kernel drops a
    connection whose sent data the leader has not acknowledged within ``UNACKED_HEARTBEATS``
    intervals (TCP_USER_TIMEOUT, which gRPC's core sets to ``grpc.keepalive_timeout_ms`` on
    a channel that has a keepalive time), and the agent sends a message at least every
    renewal bound (``leader.service.renew_seconds``: 20 s at the product's 5 s) and a PING
    more often (below), so a vanished leader is noticed within a PING and 2 intervals (18 s at
    5 s; 30 s before session 71) and the next heartbeat opens a new stream. The agent PINGs
    the leader every
    ``tlsroll.rpc.agent_ping_seconds`` (8 s at 5 s), just before the leader's own keepalive
    PING would be due (``tlsroll.rpc.keepalive_seconds``): gRPC's core starts that time again
    whenever something arrives, so the leader, whose own PING costs it about five times what
    answering one does (session 71, issue 15), PINGs only an agent that went silent, and
    notices it as before. The PING's answer is bounded as a message's is: an agent whose
    leader has not answered within ``UNACKED_HEARTBEATS`` intervals drops the connection (a
    leader whose process stopped is noticed so too, within a PING and 2 intervals). No
    bandwidth-delay probe either: gRPC's core otherwise answers a leader's message on a quiet
    connection with a PING (as the leader's channels to agents, ``tlsroll.rpc.NO_BDP_PROBE``).
    The PINGs are timed by the leader's interval where it is known (``leader_interval``: its
    answers say it, ``HeartbeatResponse.interval_seconds``), as its keepalive is: an agent at
    1 s under a leader at 5 s PINGed every 1.2 s, more leader CPU than the leader's own PINGs
    (session 72); and so is the bound on an unanswered PING (or unacknowledged data), so that
    it stays 2 of the intervals the PINGs come by: an agent at 1 s under a leader at 5 s, its
    PINGs every 8 s, dropped its connection 2 s into a PING's wait (session 73).
    """
    interval = leader_interval or heartbeat_interval
    return [
        ("grpc.keepalive_time_ms", int(rpc.agent_ping_seconds(interval) * 1000)),
        ("grpc.keepalive_timeout_ms", UNACKED_HEARTBEATS * 1000 * interval),
        ("grpc.http2.max_pings_without_data", 0),
        NO_BDP_PROBE,
    ]


async def _busy(question: leader_pb2.CheckQuestion) -> leader_pb2.CheckAnswer:
    """The answer to a question the agent has no room for (``QUESTIONS_AT_ONCE``)."""
    return leader_pb2.CheckAnswer(
        id=question.id,
        refused_code=BUSY.value[0],
        refused=f"{QUESTIONS_AT_ONCE} planning questions under way on this stream",
    )


class _Stream:
    """One open ``Heartbeats`` stream: messages go out with ``send``, numbered (``seq``); a
    reader task takes every response (answer or news) with ``take`` and notes which message it
    answers, so that ``send`` can wait for the answer to its own message, not take news the
    leader sent before it read the message for it (an epoch refresh would return on an older
    epoch). A leader that echoes no number (older) has any reply after the write taken as the
    answer, as before. The first reply on a stream is always the answer to the first message
    (the leader pushes news only to a stream it has counted), so it tells which leader it is.
    """

    def __init__(
        self,
        call: Beats,
        take: Callable[[leader_pb2.HeartbeatResponse], Awaitable[None]],
        ended: Callable[[_Stream], None] | None = None,
        answer: Answer | None = None,
        now: Callable[[], Awaitable[tuple[int, int]]] | None = None,
    ) -> None:
        self.call = call
        self._now = now  # the revocation list's number and the highest epoch, as now
        self.opened = asyncio.get_running_loop().time()
        self.heard = self.opened  # when the leader last said anything on it (``wants_answer``)
        self.probe_at: float | None = None  # when a message asked only to hear from the leader
        self.replies = 0
        self.seq = 0  # the number of the last message sent
        self.answered = 0  # the highest message number an answer carried
        self.echoes = False  # True once the leader answered with a message number
        self.renew = 0  # the leader's renewal bound (s); 0: a message every interval
        self.ended: BaseException | None = None
        self.last: leader_pb2.HeartbeatRequest | None = None  # the last message sent
        # How the leader's end of the call came (``broke``: it ended, or the connection broke,
        # with ``code``), unless the agent closed it first (``dropped``): ``ended`` is told.
        self.broke = False
        self.code: grpc.StatusCode | None = None
        # gRPC lost the leader's status of the end (``status_lost``): the leader ended the
        # stream, with what is not known; taken as a leader gone (not ``NOT_AT_ONCE``).
        self.lost = False
        self.dropped = False
        self.noted = False  # the link has taken note of the end (``LeaderLink._stream_ended``)
        self._on_end = ended
        self._waiters: list[asyncio.Future[None]] = []
        # The leader's planning questions (``_ask``): answered by ``answer`` in tasks of their
        # own, so that neither this reader nor the heartbeats wait for the checks.
        self._answer = answer
        self._answering: set[asyncio.Future[None]] = set()
        self._refusing: set[asyncio.Future[None]] = set()  # ``BUSY`` answers being written
        self._writing = asyncio.Lock()  # one write at a time: heartbeats and answers
        self.reader = asyncio.ensure_future(self._read(take))

    async def _read(self, take: Callable[[leader_pb2.HeartbeatResponse], Awaitable[None]]) -> None:
        try:
            while True:
                reply = await self.call.read()
                if not isinstance(reply, leader_pb2.HeartbeatResponse):
                    self.ended = TimeoutError("the leader ended the heartbeat stream")
                    self.code, self.broke = await self.call.code(), True
                    self.lost = (
                        self.code == grpc.StatusCode.INTERNAL
                        and await self.call.details() == GRPC_LOST_STATUS
                    )
                    return
                self.heard = asyncio.get_running_loop().time()
                if reply.HasField("check"):  # a question: neither an answer nor news
                    self._ask(reply.check)
                    continue
                self.renew = reply.renew_seconds
                await take(reply)
                if reply.answers:
                    self.echoes = True
                    self.answered = max(self.answered, reply.answers)
                self.replies += 1
                self._wake()
        except grpc.aio.AioRpcError as exc:
            self.ended = exc
            self.code, self.broke, self.lost = exc.code(), True, status_lost(exc)
        except Exception as exc:  # a response it could not take: the stream is dropped
            # Replaced at once, as one the leader ended (``_on_end``): the stream reads no
            # more, and news sent on it would be lost until the next beat (an interval; the
            # renewal bound's messages are quiet beats). The leader sends what the agent
            # lacks with the new stream's first answer (a list it could not check: again).
            # Logged: it was silent before. The type and message only (a revocation list or
            # an epoch; no key goes through here).
            self.ended = exc
            self.broke = True
            if not isinstance(exc, ShuttingDown):  # (the agent stops: no fault, review s69)
                log.warning(
                    "heartbeat.reply_not_taken",
                    error=f"{type(exc).__name__}: {exc}"[:200],
                    detail="the leader's heartbeat stream broke; the agent opens a new one",
                )
        finally:
            if self.ended is None:
                self.ended = TimeoutError("the heartbeat stream was closed")
            self._wake()
            if self.broke and not self.dropped and self._on_end is not None:
                self._on_end(self)

    def _ask(self, question: leader_pb2.CheckQuestion) -> None:
        """The leader asks its planning question on the stream: answered in a task of its own
        (``_reply``). Beyond ``QUESTIONS_AT_ONCE`` under way, answered at once with ``BUSY``
        (the leader asks over its channel). Not answered by an agent that cannot (it did not
        say it could), nor past as many ``BUSY`` answers being written: the leader's deadline
        then runs out, as for a Check."""
        if self._answer is None:
            log.warning(
                "heartbeat.question_dropped",
                id=question.id,
                detail="the agent could not take the leader's question now: it goes unanswered "
                "and the leader's deadline for it runs out",
            )
            return
        if len(self._answering) < QUESTIONS_AT_ONCE:
            tasks, task = (
                self._answering,
                asyncio.ensure_future(self._reply(self._answer, question)),
            )
        elif len(self._refusing) < QUESTIONS_AT_ONCE:
            log.info("heartbeat.question_busy", id=question.id)
            tasks, task = self._refusing, asyncio.ensure_future(self._reply(_busy, question))
        else:
            log.warning(
                "heartbeat.question_dropped",
                id=question.id,
                detail="the agent could not take the leader's question now: it goes unanswered "
                "and the leader's deadline for it runs out",
            )
            return
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _reply(self, answer: Answer, question: leader_pb2.CheckQuestion) -> None:
        """Answer ``question`` with a message that is otherwise a copy of the last report (a
        heartbeat like any other: the leader records it as one, and it counts for liveness),
        less its bootstrap failures (the leader adds those up), with the revocation list's
        number and the highest epoch as they are now, as a report would carry them (the last
        report's may be older: the leader would take the older list's number for the agent's,
        and send the list again). A stream that ended meanwhile takes nothing: the leader then
        asks over its channel."""
        try:
            async with asyncio.timeout(ANSWER_SECONDS):
                checked = await answer(question)
            now = await self._now() if self._now is not None else None
            message = leader_pb2.HeartbeatRequest()

            def fill(message: leader_pb2.HeartbeatRequest) -> None:
                # The last report as it is when the answer goes out, not as it was before the
                # await above: a report sent meanwhile is newer, and the leader takes every
                # message as the node's current report (audit s33 L1: an older copy written
                # after it put "healthy" back over "down" until the renewal bound).
                if self.last is not None:
                    message.CopyFrom(self.last)
                message.ClearField("bootstrap_failures")
                message.ClearField("held_crl_pem")  # (the leader has it, or asks again)
                message.wants_answer = message.closing = False
                if now is not None:
                    message.crl_number, message.highest_epoch = now
                message.check_answer.CopyFrom(checked)

            await self._write(message, fill=fill)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError) as exc:
            log.info("heartbeat.answer_failed", id=question.id, error=type(exc).__name__)
        except Exception as exc:  # never the reader's or the heartbeats' trouble
            log.error(
                "heartbeat.answer_failed",
                error=f"{type(exc).__name__}: {exc}"[:200],
                hint="the leader's question goes unanswered; a bug in tlsroll: report it with "
                "the lines before this one",
            )

    async def _write(
        self,
        request: leader_pb2.HeartbeatRequest,
        fill: Callable[[leader_pb2.HeartbeatRequest], None] | None = None,
    ) -> int:
        """Write ``request`` numbered (``seq``), one write at a time; its number. ``fill``
        makes the request once it is this write's turn (a copy of the last report, as of
        then: no report written before it is newer)."""
        if self.ended is not None:
            raise self.ended
        async with self._writing:
            if fill is not None:
                fill(request)
            self.seq += 1
            seq = request.seq = self.seq
            await self.call.write(request)
        return seq

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def send(
        self, request: leader_pb2.HeartbeatRequest, timeout: float, answer: bool = True
    ) -> None:
        """Send ``request``; with ``answer``, wait for a response after it (the leader answers
        a message that asks, and every message of an agent not in renewal mode)."""
        before = self.replies
        seq = 0

        def waiting() -> bool:
            return self.answered < seq if self.echoes else self.replies == before

        async with asyncio.timeout(timeout):
            self.last = request  # (an answer to a question sent meanwhile copies it)
            seq = await self._write(request)
            while answer and waiting():
                if self.ended is not None:
                    raise self.ended
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                await waiter

    def close(self) -> None:
        self.dropped = True
        self.reader.cancel()
        for task in (*self._answering, *self._refusing):
            task.cancel()
        self.call.cancel()

    async def finish(self, patience: float = CLOSE_SECONDS) -> None:
        """Close the stream as an agent that is alive does (stopping, or moving to a renewed
        certificate): a last message saying so (``closing``, a copy of the last report less
        its bootstrap failures), the end of its messages, then the leader's end of the call,
        at most ``patience`` seconds, and ``close``. The leader then knows the agent was alive
        up to now; a stream just dropped (cancelled) looks like an agent that vanished, alive only
        up to the last keepalive PING it could have answered, and its node may show offline
        before its next stream's first message (``leader.service.keepalive_seconds``)."""
        self.dropped = True  # the leader's end that follows is the answer to this one
        try:
            if self.ended is None and not self.call.done() and self.last is not None:

                def fill(goodbye: leader_pb2.HeartbeatRequest) -> None:
                    if self.last is not None:  # the last report as of the write (``_reply``)
                        goodbye.CopyFrom(self.last)  # an older leader: nothing new
                    # The failures a message carries are added to the leader's counts (those
                    # since the last report): the copy must not count the last message's again.
                    goodbye.ClearField("bootstrap_failures")
                    goodbye.ClearField("held_crl_pem")
                    goodbye.wants_answer, goodbye.closing = False, True

                async with asyncio.timeout(patience):
                    await self._write(leader_pb2.HeartbeatRequest(), fill=fill)
                    await self.call.done_writing()
                    await self.reader
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
            pass  # it broke meanwhile: nothing to tell
        finally:
            self.close()


class LeaderLink:
    def __init__(
        self,
        cfg: AgentConfig,
        identity: Identity,
        trust: LeaderTrust,
        journal: Journal,
        failures: FailureLog | None = None,
    ) -> None:
        self.cfg = cfg
        self.trust = trust
        self.journal = journal
        self.failures = failures
        self.target = hostport(cfg.leader_address, cfg.control_port)
        # The serial of the leader's certificate the agent dials by its name, and whether a
        # leader ever announced one (``HeartbeatResponse.leader_serial``; kept in
        # ``DATA/leader.serial.json``): see ``_trusts``.
        self.pin, self.announces = _read_pin(cfg.data_dir)
        # The serial the channel was dialed by (None: the generic name), and that a dial by
        # the pin failed (the next beat dials the generic name once: ``_want``).
        self._dialed: int | None = None
        self._fallback = False
        # What ``leader.link_untrusted`` said was ignored since the last trusted answer.
        self._ignored_said: set[str] = set()
        self._dialed_said: int | None = None  # the last serial ``leader.dialed`` said
        self._dial_failed_said: int | None = None  # ``leader.serial_dial_failed`` said of it
        self._keeping = asyncio.Lock()  # one write of DATA/leader.serial.json at a time
        self._revoked_said = 0  # the last announced serial said revoked
        # The leader's heartbeat interval as its trusted answers say it (None: not heard yet),
        # and the one the channel's PINGs are timed by (``leader_channel_options``): a channel
        # timed otherwise is made again at the next beat (``_redial``). The last one heard is
        # kept with the serial (``_keep_pin``): a restarted agent's first channel is timed by
        # it, and is not made again at its second beat as it was at every start (session 73).
        kept = nodefiles.read_leader_interval(cfg.data_dir)
        self.leader_interval = kept if kept is not None and kept <= LEADER_INTERVAL_MAX else None
        self._kept_interval = self.leader_interval  # what DATA/leader.serial.json says
        self._pinged_by: int | None = None
        self.identity = identity
        self.channel, self.stub = self._connect(identity, self._want())
        if self._dialed is not None:
            self._dialed_said = self._dialed
            log.info("leader.dialed", leader=self.target, serial=f"{self._dialed:x}")
        self.healthy: bool | None = None
        # When the beats began to fail (``monotonic``; None: the last one was answered), and
        # whether ``heartbeat.still_failing`` has been said of this outage.
        self.monotonic: Callable[[], float] = time.monotonic
        self._failing_since: float | None = None
        self._outage_said = False
        # This agent's id on its streams (``HeartbeatRequest.agent_instance``), drawn as it
        # starts: the leader tells two agents with one identity apart by it (a cloned machine).
        self.instance = secrets.token_hex(8)
        # The bootstrap failure report under way, numbered (``failures_report``): sent again
        # unchanged until the leader answered it, so that it never counts it twice (audit
        # s33 L2); and the last number given.
        self._report: tuple[int, list[FailureCount]] | None = None
        self._reports = 0
        # The agent's clock (the runtime's, which its service and renewal read too): each
        # message says when it was sent by it (``sent_at``).
        self.clock: Callable[[], dt.datetime] = _utc_now
        self.renewal: Callable[[], RenewalState] | None = None
        # What the managed server runs now (NodeAgentService.server_view), sent with every
        # heartbeat so the leader sees a server that went down after its rollout.
        self.server_view: Callable[[], Awaitable[agent_pb2.ServerView]] | None = None
        # Why the node's bootstrap service that should run did not start, "" if it runs or
        # need not, None before the agent knows (``BootstrapHost.problem``), sent with the
        # server's view.
        self.bootstrap_problem: Callable[[], str | None] | None = None
        # Where that is "": what the service lacks by the server's view (its server serves
        # https with a password, its journal no settings: ``BootstrapHost.lacking``), "" if
        # nothing, None if not known now; sent the same way.
        self.bootstrap_lacking: Callable[[agent_pb2.ServerView], str | None] | None = None
        # (Read on a thread, with the journal's facts.) Why the agent cannot write its own
        # store safely now (its journal's checkpoint fails, free space low for a switch:
        # ``NodeAgentService.store_trouble``), [] if it can: sent with every message
        # (``HeartbeatRequest.store_trouble``), news when it comes or goes (``report_key``).
        # The agent's is ``StoreWatch.current``, which never blocks: the free space is read
        # off the beat's path (a hung mount stalled every beat: session 75).
        self.store_trouble: Callable[[], list[str]] | None = None
        # Answers the leader's planning question asked on the heartbeat stream (``Check``'s
        # work: ``NodeAgentService.answer_check``); None: the agent does not say it can, and
        # the leader asks over its channel.
        self.answer_check: Answer | None = None
        # Told the leader's refusal of this node as no longer in the cluster (removed, or its
        # certificate revoked: ``rpc.node_removed``) at each heartbeat so refused, and None at
        # the first one answered after that (``BootstrapHost.set_removed``: the bootstrap
        # service takes no workstation password meanwhile; audit s45rt3 M3).
        self.on_removed: Callable[[str | None], None] | None = None
        self._removed = False
        self._logged_removed = False  # agent.removed_from_cluster logged by this process
        self._lock = asyncio.Lock()
        self._stream: _Stream | None = None
        self._sent: tuple[bytes, float] | None = None  # report_key and time of the last message
        # False once the leader answered UNIMPLEMENTED to the stream (older than it).
        self.streaming = True
        self._unary_beats = 0
        # Set when the stream ended by itself and the next beat should come after a short
        # pause (``_reconnect``), not an interval after the last (``_stream_ended``).
        self._ended = asyncio.Event()
        # Set when what the server runs has just changed (``beat_soon``): the next beat comes
        # now, not an interval after the last.
        self._soon = asyncio.Event()
        self._reconnect = 0.0
        self._attempt = 0  # streams in a row that ended soon after opening
        # Forgets the stages of rollouts the leader says have ended
        # (``HeartbeatResponse.ended_stages``: ``NodeAgentService.forget_ended``); None: the
        # agent says it holds none.
        self.stages_ended: Callable[[Sequence[str]], Awaitable[None]] | None = None
        self._ended_stages: set[str] = set()  # told, not yet forgotten (``_forget``)
        # The leader asked for the revocation list this agent holds (``wants_crl``): the next
        # message carries it, and goes now (``_take``). A leader restored from a backup sends
        # no list of its own until it has recorded what this one revokes.
        self._crl_wanted = False
        # The number of the held list last said too large to send (``HELD_CRL_MAX``): said
        # once per list, not at each of the leader's asks (each heartbeat until its patience
        # ends: review b4 of s64, L3).
        self._crl_too_large = 0
        self._forgetting: asyncio.Future[None] | None = None

    def _ping_interval(self) -> int:
        """The heartbeat interval the channel's PINGs are timed by: the leader's once known."""
        return self.leader_interval or self.cfg.heartbeat_interval

    def _want(self) -> int | None:
        """The serial to dial the leader by: the pin, unless revoked, or a dial by it failed
        at the last beat (``_fallback``); None: the generic name."""
        pin = self.pin
        if pin is None or self._fallback or pin in self.trust.revoked:
            return None
        return pin

    def _trusts(self, dialed: int | None) -> bool:
        """Whether the leader's answers on a channel dialed by ``dialed`` are acted on (an epoch,
        ended stages, a refusal of the node, a request for the agent's list): dialed by a
        serial not revoked (only the certificate of that serial passed the handshake), or by
        the generic name to a leader that never announced a serial (an older one: as
        before). Else only the revocation lists and the serial are taken (the CA signed the
        lists; the serial only says which name to dial): a revoked leader certificate, or one
        of an older leader, answering in the leader's place is not obeyed (review s67 M2)."""
        if dialed is None:
            return not self.announces
        return dialed not in self.trust.revoked

    async def _learn(self, text: str) -> None:
        """The serial the leader says it serves (``leader_serial``): kept and dialed from the
        next beat on, unless revoked."""
        if not text:
            return
        try:
            serial = nodefiles.parse_serial(text)
        except ValueError as exc:
            log.warning(
                "leader.serial_refused",
                error=str(exc),
                detail="the leader announced a certificate serial the agent cannot read; the "
                "agent keeps the one it holds",
            )
            return
        if serial in self.trust.revoked:
            if serial != self._revoked_said:
                self._revoked_said = serial
                log.warning(
                    "leader.serial_revoked",
                    serial=text,
                    detail="the leader's answer names a revoked certificate: not dialed",
                )
            return
        if serial != self.pin or not self.announces:
            previous = self.pin
            self.pin, self.announces = serial, True
            await self._keep_pin()
            log.info(
                "leader.serial_learned",
                serial=text,
                previous="" if previous is None else f"{previous:x}",
            )
            if self._dialed != serial:
                self.beat_soon()  # the next beat dials it (``_redial``)
        # The same serial named again on the generic name's link (a dial by it failed this
        # beat): the next beat tries it again at its time, not at once: beats hurried so ran
        # back to back, two dials each, while someone answered there (closing review of s67 L1).

    async def _keep_pin(self) -> None:
        try:
            async with self._keeping:  # (what is held as it is written: the last one wins)
                # (tried once per interval heard: a data dir it cannot write is said once)
                self._kept_interval = interval = self.leader_interval
                await asyncio.to_thread(
                    nodefiles.write_leader_pin,
                    self.cfg.data_dir,
                    self.pin,
                    self.announces,
                    interval,
                )
        except OSError as exc:  # held all the same; the next start learns it again
            log.warning(
                "leader.serial_not_kept",
                error=os_error_text(exc),
                detail="the agent could not save the leader's serial and interval to its data "
                "dir; it holds them in memory and learns them again at the next start",
            )

    async def _forget_revoked_pin(self) -> None:
        """A revocation list revokes the pinned serial: it is forgotten (the leader is issued
        a new certificate; its next answer names it), and the next beat dials again."""
        if self.pin is not None and self.pin in self.trust.revoked:
            log.warning("leader.serial_revoked", serial=f"{self.pin:x}", detail="dialed no more")
            self._revoked_said = self.pin
            self.pin = None
            await self._keep_pin()
            self.beat_soon()

    async def _redial(self, *, fresh: bool = False) -> None:
        """(Under the lock.) Dial the leader again when the name to dial changed (``_want``),
        or ``fresh``: on a new channel all the same (``_exchange_by_pin``)."""
        want = self._want()
        self._fallback = False  # one beat by the generic name, then the pin again
        if want == self._dialed and not fresh and self._pinged_by == self._ping_interval():
            return
        old = self.channel
        await self._finish_stream()
        self.channel, self.stub = self._connect(self.identity, want)
        # Said once per serial: a dial by the generic name after one by the pin failed (the
        # leader away, or someone on its address) and back to the pin are not news.
        said = want is not None and want != self._dialed_said
        if said:
            self._dialed_said = want
        (log.info if said else log.debug)(
            "leader.dialed", leader=self.target, serial="" if want is None else f"{want:x}"
        )
        await old.close(None)

    def _ignored(self, what: str) -> None:
        """An answer on an untrusted channel (``_trusts``) said ``what``: not acted on, said
        once until a trusted answer comes."""
        if what not in self._ignored_said:
            self._ignored_said.add(what)
            log.warning(
                "leader.link_untrusted",
                leader=self.target,
                ignored=what,
                detail="the leader was dialed by its generic name and it announced serials "
                "before: only its revocation lists and serial are taken (a revoked leader "
                "certificate may be answering); the agent dials the serial again",
            )

    def _connect(
        self, identity: Identity, serial: int | None = None
    ) -> tuple[grpc.aio.Channel, leader_pb2_grpc.LeaderAsyncStub]:
        td = self.trust.trust_domain
        self._dialed = serial
        self._pinged_by = self._ping_interval()
        name = spiffe.leader_host(td) if serial is None else spiffe.leader_serial_host(td, serial)
        creds = grpc.ssl_channel_credentials(
            root_certificates=identity.ca_pem,
            private_key=identity.key_pem,
            certificate_chain=identity.cert_pem,
        )
        channel = grpc.aio.secure_channel(
            self.target,
            creds,
            options=[
                ("grpc.ssl_target_name_override", name),
                *leader_channel_options(self.cfg.heartbeat_interval, self._pinged_by),
                # A restarted leader hears from this agent within a heartbeat interval.
                *reconnect_options(self.cfg.heartbeat_interval),
            ],
        )
        return channel, leader_pb2_grpc.LeaderStub(channel)

    async def use(self, identity: Identity) -> None:
        """Call the leader with ``identity`` (a renewed certificate) from now on."""
        async with self._lock:
            old = self.channel
            await self._finish_stream()  # the next heartbeat opens one with the new certificate
            self.identity = identity
            self.channel, self.stub = self._connect(identity, self._dialed)
        await old.close(None)

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    async def _finish_stream(self) -> None:
        """Close the stream as a live agent does (``_Stream.finish``)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.finish()

    def _stream_ended(self, stream: _Stream) -> None:
        """``stream`` ended without the agent closing it (its reader saw the leader's end, or
        a message failed on it): the next beat comes after ``reconnect_pause``, so that the
        node is not shown offline until the usual one. Not after a refusal (``NOT_AT_ONCE``),
        nor once streams kept ending soon after they opened."""
        if not stream.broke or stream.noted:
            return
        stream.noted = True
        interval = self.cfg.heartbeat_interval
        age = asyncio.get_running_loop().time() - stream.opened
        lasted = age >= min(interval, LASTED_SECONDS)
        self._attempt = 0 if lasted else self._attempt + 1
        if stream.code in NOT_AT_ONCE:
            return
        pause = reconnect_pause(self._attempt, interval)
        if pause is None:
            return
        self._reconnect = pause
        self._ended.set()
        code = (
            LOST_STATUS
            if stream.lost
            else stream.code.name
            if stream.code is not None
            else "NOT_TAKEN"  # (a reply it could not take)
        )
        log.info("heartbeat.stream_ended", leader=self.target, code=code, again_in=round(pause, 3))

    async def _take(self, reply: leader_pb2.HeartbeatResponse, dialed: int | None = None) -> None:
        """A response from the leader, an answer or news on a channel dialed by ``dialed``
        (``_trusts``): its revocation list and serial, then its epoch and the rollouts it says
        have ended of the stages the agent holds (forgotten in a task of their own: the
        reader does not wait for the agent's commands)."""
        # Judged before the serial it names is learned: an agent that never heard one trusts
        # the generic name's answer that first names one, as it trusted those before (its
        # epoch was ignored, with a warning, at every agent's first beat of this release).
        trusted = self._trusts(dialed)
        if reply.crl_pem:
            await asyncio.to_thread(self.trust.take_crl, reply.crl_pem)
            await self._forget_revoked_pin()
            trusted = trusted and self._trusts(dialed)  # (a list that revokes the one dialed)
        # The leader's interval times the agent's PINGs (``leader_channel_options``): its
        # keepalive is timed by it. Taken from a trusted answer only, within what a leader's
        # config allows (an older leader or a message without it: 0, the agent's own); before
        # the serial is learned, so that the record written then keeps both at once.
        if trusted and 1 <= reply.interval_seconds <= LEADER_INTERVAL_MAX:
            self.leader_interval = reply.interval_seconds
        await self._learn(reply.leader_serial)
        if self.leader_interval != self._kept_interval:
            await self._keep_pin()
        # A request for the list the agent holds is answered on any link (closing review of
        # s67 M2): the list is the CA's, sending it obeys nothing, and a leader rolled back to a
        # revoked certificate (a VM snapshot) learns from it that its certificate is revoked;
        # ignored, it would give the agents its own older list after its patience.
        if reply.wants_crl and not self._crl_wanted:
            self._crl_wanted = True
            self.beat_soon()
        if not trusted:
            # Each said once on its own: said together ("epoch,ended_stages"), an epoch already
            # said was said again with the first ended stages.
            for what, there in (
                ("epoch", reply.epoch > self.trust.announced_epoch),
                ("ended_stages", bool(reply.ended_stages)),
            ):
                if there:
                    self._ignored(what)
            if reply.leader_serial:
                # A leader of this release (it names its serial) heard by the generic name: its
                # epoch is taken once the serial is dialed. One that names none (a leader taken
                # back to an earlier release; README "Downgrading") is refused as such.
                self.trust.heard_untrusted(reply.epoch)
            return
        self._ignored_said.clear()
        self.trust.announce(reply.epoch)
        if reply.ended_stages and self.stages_ended is not None:
            self._ended_stages.update(reply.ended_stages[:STAGES_REPORTED])
            if self._forgetting is None or self._forgetting.done():
                self._forgetting = asyncio.ensure_future(self._forget(self.stages_ended))

    async def _forget(self, forget: Callable[[Sequence[str]], Awaitable[None]]) -> None:
        """Forget the stages the leader said have ended, until none is left to (more may come
        meanwhile). A failure is logged; the stage stays in the heartbeat's list, and the
        leader says so again in its answer to the next message (at the bound at the latest):
        the next try."""
        while self._ended_stages:
            ids = sorted(self._ended_stages)
            self._ended_stages.clear()
            try:
                await forget(ids)
            except Exception as exc:
                log.warning(
                    "stage.forget_failed",
                    error=f"{type(exc).__name__}: {exc}"[:200],
                    detail="staged files of ended rollouts could not be forgotten; the next "
                    "sweep tries again",
                )

    def _answer_on(self, dialed: int | None) -> Answer | None:
        """How the leader's planning questions on a stream of a channel dialed by ``dialed``
        are answered: by ``answer_check`` while the link is trusted (``_trusts``, judged at
        each question), else refused as ``BUSY`` without a word of the node's (closing review
        of s67, 2: the answer, the server's view and the checks' findings, went to whoever
        answered the generic name, a revoked leader certificate too). The leader then asks
        over its own channel (``leader.service.LeaderService.ask_check``'s ``NO_ROOM``), where
        the agent's service checks the caller's certificate (``LeaderTrust.check_leader``)."""
        answer = self.answer_check
        if answer is None:
            return None

        async def answer_on(question: leader_pb2.CheckQuestion) -> leader_pb2.CheckAnswer:
            if self._trusts(dialed):
                return await answer(question)
            self._ignored("check")
            return leader_pb2.CheckAnswer(
                id=question.id,
                refused_code=BUSY.value[0],
                refused="asked on a link the agent does not trust (the leader's generic name):"
                " ask over the leader's channel",
            )

        return answer_on

    def _quiet(self, request: leader_pb2.HeartbeatRequest) -> bool:
        """True if ``request`` need not be sent: the stream is open and in renewal mode, the
        report says nothing new, and the renewal bound does not pass before the next beat."""
        stream, sent = self._stream, self._sent
        if stream is None or stream.ended is not None or not stream.renew or sent is None:
            return False
        # The next beat comes an interval (and a little) later: this one is the last before
        # the bound if the next would pass it by more than half an interval. The next one may
        # also wait up to SERVER_VIEW_SECONDS for the server's status before it leaves: the
        # leader allows for both (``leader.service.RENEW_GRACE``), so an agent at 1 s still
        # sends one message in 4 intervals, not one every beat.
        later = asyncio.get_running_loop().time() + self.cfg.heartbeat_interval / 2
        going = request
        if not self._trusts(self._dialed):
            # Compared as it would go (``_withholding``), as the last one was keyed: in full,
            # a link that stays untrusted saw news in what is never sent there (s69).
            going = leader_pb2.HeartbeatRequest()
            going.CopyFrom(request)
            withhold(going)
        return sent[0] == report_key(going) and later <= sent[1] + stream.renew

    async def _exchange(self, request: leader_pb2.HeartbeatRequest, answer: bool) -> None:
        """Send one heartbeat and take the leader's answer: on the stream (opened if none
        is), or a unary call to a leader without it. In renewal mode the answer is waited for
        only if ``answer``, the message is the stream's first, or the leader has said nothing
        on the stream for a while (``wants_answer``: a leader whose Python stopped); the reader
        takes news whenever it comes, and a vanished leader is noticed as
        ``leader_channel_options`` says.
        AioRpcError or TimeoutError when it failed."""
        timeout = self.cfg.heartbeat_interval
        if self.streaming:
            old = self._stream
            if (
                old is not None
                and old.ended is not None
                and await _status(old) != grpc.StatusCode.UNIMPLEMENTED
            ):
                self._drop_stream()  # it ended since the last message: a new one now
            if self._stream is None:
                call = self.stub.Heartbeats()  # type: ignore[call-arg]
                take = functools.partial(self._take, dialed=self._dialed)
                ask = self._answer_on(self._dialed)
                self._stream = _Stream(call, take, self._stream_ended, ask, self._now)
                self._ended.clear()  # an earlier stream's end: this beat is the new one
            stream = self._stream
            request.renews = True
            now = asyncio.get_running_loop().time()
            if stream.probe_at is not None and stream.heard >= stream.probe_at:
                stream.probe_at = None  # the leader said something since: it is alive
            # A message that asks only to hear from the leader (``wants_answer``) is not waited
            # for: a leader slow for a moment (its loop or its store busy longer than an
            # interval) is no leader gone. Not heard from within a renewal bound of it, the
            # leader is taken for gone (review 1 of session 34, L1).
            probe = (
                not answer
                and stream.renew > 0
                and stream.probe_at is None
                and wants_answer(stream.heard, now, timeout, stream.renew)
            )
            request.wants_answer = answer or not stream.renew or probe
            # Stamped before the write: the leader's bound runs from when it read the message,
            # not from when the answer came back (after a revocation list was checked).
            self._sent = (report_key(request), now)
            ended: BaseException
            try:
                # (half an interval early: the message at the bound may come at a beat before it)
                if (
                    stream.probe_at is not None
                    and now - stream.probe_at >= stream.renew - timeout / 2
                ):
                    raise TimeoutError("no answer from the leader within the renewal bound")
                await stream.send(request, timeout, request.wants_answer and not probe)
                if probe:
                    stream.probe_at = now
                return
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError) as exc:
                ended = exc
            # The stream is broken: the next heartbeat opens a new one (soon, if it ended by
            # itself: whichever of this and its reader sees the end first tells the link).
            status = await _status(stream)
            if (
                status_lost(ended)
                and isinstance(stream.ended, grpc.aio.AioRpcError)
                and not status_lost(stream.ended)
            ):
                # gRPC lost the leader's status for the write, but the reader read it first
                # (``_status``): that one is the end's (a refusal is told as one).
                ended = stream.ended
            if isinstance(ended, grpc.aio.AioRpcError) and not stream.broke:
                stream.code, stream.broke = ended.code(), True
                stream.lost = status_lost(ended)
            self._stream_ended(stream)
            self._drop_stream()
            if status != grpc.StatusCode.UNIMPLEMENTED:
                if isinstance(ended, grpc.aio.AioRpcError):
                    raise ended
                if status == grpc.StatusCode.UNAUTHENTICATED and stream.call.done():
                    details = await stream.call.details()
                    if rpc.node_removed(status, details):  # (the send saw the end first)
                        self._removed_said(details)
                if stream.lost or (
                    status == grpc.StatusCode.INTERNAL
                    and await stream.call.details() == GRPC_LOST_STATUS
                ):
                    # (not an INTERNAL of the leader's)
                    raise StreamEnded(f"the heartbeat stream ended: {LOST_STATUS}", LOST_STATUS)
                if status is not None:
                    raise StreamEnded(f"the heartbeat stream ended: {status.name}", status)
                raise TimeoutError("the heartbeat stream got no reply in time") from None
            self.streaming = False
            self._unary_beats = 0
            request.renews = request.wants_answer = False
            log.info("heartbeat.unary", leader=self.target, reason="the leader has no stream")
        self._unary_beats += 1
        if self._unary_beats >= STREAM_RETRY_BEATS:  # the leader may have been upgraded
            self.streaming = True
        dialed = self._dialed
        await self._take(await self.stub.Heartbeat(request, timeout=timeout), dialed)

    async def renew(self, csr_pem: bytes) -> tuple[bytes, bytes]:
        """Ask the leader to renew this agent's certificate; the new certificate and the CA
        certificate the leader issues with (PEM; empty from an older leader). TransientError
        when the leader did not answer, RenewalRefused when it said no."""
        async with self._lock:
            try:
                reply = await self.stub.RenewNodeCertificate(
                    leader_pb2.RenewNodeCertificateRequest(csr_pem=csr_pem, names_apart=True),
                    timeout=max(self.cfg.heartbeat_interval, 15),
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise TransientError(f"renewal at {self.target}: {exc.details()}") from None
                raise RenewalRefused(
                    f"the leader refused the renewal: {exc.details()} ({exc.code().name})"
                ) from None
        return bytes(reply.certificate_pem), bytes(reply.ca_certificate_pem)

    async def _now(self) -> tuple[int, int]:
        """The revocation list's number the agent holds and its journal's highest epoch."""
        return self.trust.crl_number, await asyncio.to_thread(self.journal.highest_epoch)

    def _failure_report(self) -> tuple[int, list[FailureCount]]:
        """The bootstrap failures this beat carries, and their report's number (0: none): the
        report under way, unchanged, until the leader answered it; else what is pending now,
        under a new number. (Sent again merged with failures since, the report had counts the
        leader could not tell from new ones, and it added the resent part twice.)"""
        if self.failures is None:
            return 0, []
        if self._report is None:
            pending = self.failures.pending()
            if not pending:
                return 0, []
            self._reports += 1
            self._report = (self._reports, pending)
        return self._report

    async def beat(self, *, quiet: bool = False) -> None:
        """One heartbeat; TransientError if the leader did not answer. ``quiet``: not sent
        if the leader need not hear it (``_quiet``: the run loop's beats)."""
        async with self._lock:
            await self._redial()
            report_id, report = self._failure_report()
            highest, unswitched, trouble = await asyncio.to_thread(self._facts)
            crl_number, crl_pem = self.trust.held()
            # Asked for (``_take``): sent with this message (again with the next if it fails).
            held = crl_pem if self._crl_wanted else b""
            if len(held) > HELD_CRL_MAX:
                # The leader sends its own once it has waited long enough for this one.
                if crl_number != self._crl_too_large:
                    self._crl_too_large = crl_number
                    log.warning(
                        "crl.held_too_large",
                        number=crl_number,
                        size=len(held),
                        limit=HELD_CRL_MAX,
                        detail="the agent's revocation list is too large to send back to the "
                        "leader; the leader sends its own instead",
                    )
                held, self._crl_wanted = b"", False
            request = leader_pb2.HeartbeatRequest(
                agent_version=__version__,
                features=features.this_agent(),
                bootstrap_failures=failure_messages(report),
                highest_epoch=highest,
                crl_number=crl_number,
                held_crl_pem=held,
                agent_port=self.cfg.port,
                answers_checks=self.answer_check is not None,
                # Only where someone removes what the leader says has ended.
                unswitched_stages=unswitched if self.stages_ended is not None else (),
                agent_instance=self.instance,
                failures_report=report_id,
                store_trouble=trouble,
            )
            if self.renewal is not None:
                state = self.renewal()
                if (due := _ts(state.due_at)) is not None:
                    request.renewal_due_at.CopyFrom(due)
                if (since := _ts(state.failing_since)) is not None:
                    request.renewal_failing_since.CopyFrom(since)
                    request.renewal_error = state.error[:200]
            if self.server_view is not None:
                with contextlib.suppress(TimeoutError):
                    # Not wait_for: 3.11's can swallow the cancellation of the agent's stop
                    # when it meets the view's result, and this loop then never ends.
                    async with asyncio.timeout(SERVER_VIEW_SECONDS):
                        view = await self.server_view()
                    request.server.CopyFrom(live_server(view))
                    if self.bootstrap_problem is not None:
                        # None: not known yet (the agent's start has not tried the service):
                        # said as such, not as "no problem" (s43's Left 2).
                        said = self.bootstrap_problem()
                        if said == "" and self.bootstrap_lacking is not None:
                            said = self.bootstrap_lacking(view)
                        if said is None:
                            request.server.bootstrap_pending = True
                        else:
                            request.server.bootstrap_problem = said[:200]
            if quiet and not held and self._quiet(request):
                return
            # Stamped as it goes, not before the journal and the server's status were read
            # (up to SERVER_VIEW_SECONDS): the leader reads the node's clock from it, and the
            # time in between would count as the node being behind (``leader.node_clocks``).
            request.sent_at.FromDatetime(self.clock())
            if held:  # (before the answer: one that asks again sets it again)
                self._crl_wanted = False
            try:
                # The epoch asked for now (not quiet), or failures the leader must have taken.
                trusted = await self._exchange_by_pin(
                    request, answer=not quiet or bool(report) or bool(held)
                )
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                if held:
                    self._crl_wanted = True  # the next message carries it
                if status_lost(exc):
                    # Not an error of the leader's (its INTERNAL says to see its log): gRPC's
                    # client lost the leader's end of the stream (``GRPC_LOST_STATUS``), as a
                    # refusal came while the message went. Told as such, and taken as any end.
                    code, detail = LOST_STATUS, LOST_DETAIL
                elif isinstance(exc, grpc.aio.AioRpcError):
                    code, detail = exc.code().name, str(exc.details())
                    if not self.streaming and exc.code() == grpc.StatusCode.UNAVAILABLE:
                        self.streaming = True  # the leader may come back upgraded: try again
                elif isinstance(exc, StreamEnded):  # (the write saw the end: its status)
                    code = exc.code.name if isinstance(exc.code, grpc.StatusCode) else exc.code
                    detail = str(exc)
                else:
                    code, detail = "DEADLINE_EXCEEDED", str(exc)
                if isinstance(exc, grpc.aio.AioRpcError) and rpc.node_removed(
                    exc.code(), exc.details()
                ):
                    self._removed_said(detail)
                # (A pinned beat that failed so is no sign of another certificate: one that did
                # not reach the leader was made again at once, afresh and by the generic name
                # (``_exchange_by_pin``); a refusal or a slow leader answered by the pin. The
                # next beat dials the pin again: by the generic name it took no epoch, and a
                # command's epoch question then failed: s68 leaderpin L2.)
                self._failed(code, detail)
                raise TransientError(f"heartbeat to {self.target}: {detail}") from None
            # Only the leader the agent trusts took them (``_withhold``): a holder of a revoked
            # leader key answering the generic name dropped them before, unseen by the leader.
            if self.failures is not None and trusted:
                self.failures.reported(report)
                self._report = None
            if self._removed and self._trusts(self._dialed):
                self._said_removed(None)
            if self._dialed is not None:
                self._dial_failed_said = None
            if self.healthy is not True:
                renew = self._stream.renew if self._stream is not None else 0
                outage: dict[str, float] = {}
                if self._failing_since is not None:
                    outage["outage_seconds"] = round(self.monotonic() - self._failing_since, 1)
                log.info(
                    "heartbeat.ok", leader=self.target, stream=self.streaming, renew=renew, **outage
                )
            self.healthy = True
            self._failing_since, self._outage_said = None, False

    def _facts(self) -> tuple[int, list[str], list[str]]:
        """(On a thread.) What a heartbeat reports from the journal (``heartbeat_facts``) and of
        the agent's store (``store_trouble``, bounded), in one hop."""
        highest, unswitched = self.journal.heartbeat_facts(STAGES_REPORTED)
        trouble = self.store_trouble() if self.store_trouble is not None else []
        return (
            highest,
            unswitched,
            [cut_trouble(t) for t in trouble[:STORE_TROUBLE_MAX]],
        )

    def _failed(self, code: str, detail: str) -> None:
        """A beat failed (``code``, ``detail``: what the log says of it). The first of an
        outage is ``heartbeat.failed``: info where the leader is away, restarting or slow
        (``PASSING``: a planned restart is nothing for the admin to do), a warning for any
        other failure (a refusal); one that lasts ``OUTAGE_WARN_SECONDS`` is a warning,
        ``heartbeat.still_failing``, once per outage."""
        now = self.monotonic()
        if self.healthy is not False:
            self._failing_since, self._outage_said = now, False
            if code in PASSING:
                log.info("heartbeat.failed", leader=self.target, code=code, detail=detail)
            else:
                log.warning(
                    "heartbeat.failed", leader=self.target, code=code, detail=detail,
                    hint="the leader is there but refused this heartbeat or failed on it: "
                    "see the detail, and the leader's log (journalctl -u tlsroll-leader)",
                )  # fmt: skip
        elif (
            self._failing_since is not None
            and not self._outage_said
            and now - self._failing_since >= OUTAGE_WARN_SECONDS
        ):
            self._outage_said = True
            log.warning(
                "heartbeat.still_failing", leader=self.target,
                seconds=round(now - self._failing_since), code=code, detail=detail,
                hint=OUTAGE_HINT,
            )  # fmt: skip
        self.healthy = False

    async def _exchange_by_pin(self, request: leader_pb2.HeartbeatRequest, answer: bool) -> bool:
        """(Under the lock.) ``_exchange``; whether the link it went through is trusted
        (``_trusts``; on one that is not, ``_withhold``'s part is left out). One on a channel
        dialed by the pinned serial that
        could not connect (UNAVAILABLE) is made again at once on a channel dialed by it afresh,
        and if that fails too, by the generic name, whose answer names the leader's serial now:
        the next beat dials that (``_learn``, ``_redial``). Could not connect: any of the shapes
        ``unreached`` knows, not only an ``AioRpcError`` UNAVAILABLE.

        The fresh dial first: a channel that lost the leader waits out gRPC's reconnect backoff
        (up to an interval) and fails every call at once meanwhile, whatever the leader serves.
        A leader restarted in that wait was answered by the generic name, where its epoch is not
        taken: its first command was refused, "epoch never announced", and its rollout halted
        (project CI of session 67's last HEAD). The generic name then is left to a handshake
        that fails by the pin now (the leader's certificate issued again, after a restore or a
        revocation) or a leader still away. Waiting for the next beat left the leader without
        word from the node for an interval more (a restored leader relearns a node's renewed
        certificate from its first heartbeat)."""
        try:
            return await self._withholding(request, answer)
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            # Any shape the failure takes (``unreached``): a write that saw the call done
            # before its reader did gave a TimeoutError, and the beat failed (review of s67).
            if self._dialed is None or not unreached(exc):
                raise
        await self._redial(fresh=True)
        request.sent_at.FromDatetime(self.clock())
        try:
            return await self._withholding(request, answer)
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            if self._dialed is None or not unreached(exc):
                raise
            if self._dial_failed_said != self._dialed:  # once until a beat by it is answered
                self._dial_failed_said = self._dialed
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                log.info(
                    "leader.serial_dial_failed",
                    leader=self.target,
                    serial=f"{self._dialed:x}",
                    detail=str(detail)[:200],
                )
        self._fallback = True
        await self._redial()
        request.sent_at.FromDatetime(self.clock())
        return await self._withholding(request, answer)

    async def _withholding(self, request: leader_pb2.HeartbeatRequest, answer: bool) -> bool:
        """``_exchange`` on the channel as dialed, ``request`` less what only the leader the
        agent trusts is told (``withhold``) where it does not trust the link (``_trusts``);
        whether it does."""
        trusted = self._trusts(self._dialed)
        if not trusted:
            withhold(request)
        await self._exchange(request, answer)
        return trusted

    def removed_at_start(self, why: str | None) -> None:
        """What an earlier run of the agent was last told (``BootstrapHost.removed``, from the
        journal): the first heartbeat the leader answers says "accepted again", and clears it."""
        self._removed = why is not None

    def _removed_said(self, why: str) -> None:
        """The leader refused this node as no longer in the cluster: taken only on a trusted
        channel (``_trusts``)."""
        if self._trusts(self._dialed):
            self._said_removed(why)
        else:
            self._ignored("removed")

    def _said_removed(self, why: str | None) -> None:
        # Logged once per refusal in this process, also when the refusal came from an earlier
        # run (``removed_at_start``: review s46rev1 L8, an operator grepping this run's log for
        # the error found only the start's ``bootstrap.removed_earlier``).
        if why is not None and not self._logged_removed:
            log.error("agent.removed_from_cluster", leader=self.target, detail=why[:200])
        elif why is None:
            log.warning(
                "agent.accepted_again",
                leader=self.target,
                detail="the leader accepts this node again: its removal said before is over",
            )
        self._removed = self._logged_removed = why is not None
        if self.on_removed is not None:
            self.on_removed(why)

    def beat_soon(self) -> None:
        """What the managed server runs may have just changed (a transaction ended, whatever
        its outcome: ``Runner.on_end``; a scope freeze's Freeze, Unfreeze or lift:
        ``NodeAgentService.on_freeze_change``): the next heartbeat, with the server's view,
        comes now. Before, `tlsroll nodes` showed a node switched to https as on http for up
        to an interval after its rollout had completed (session 56's README walk)."""
        self._soon.set()

    async def run(self) -> None:
        """Beat until cancelled: every interval, sooner when the stream ended by itself
        (``_stream_ended``), or at once when the server changed (``beat_soon``). A beat that
        fails in an unforeseen way is logged and the next one comes as usual: an agent that
        stopped heartbeating would look offline for good while still serving, and get no
        revocation lists."""
        while True:
            self._soon.clear()  # (this beat carries what changed before it)
            try:
                await self.beat(quiet=True)
            except TransientError:  # logged by beat (``_failed``)
                pass
            except Exception as exc:
                log.error(
                    "heartbeat.crashed", error=f"{type(exc).__name__}: {exc}"[:200], hint=CRASH_HINT
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.heartbeat_interval):
                    ended = asyncio.ensure_future(self._ended.wait())
                    soon = asyncio.ensure_future(self._soon.wait())
                    try:
                        await asyncio.wait({ended, soon}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        ended.cancel()
                        soon.cancel()
                    if not self._ended.is_set():
                        continue  # the server changed: beat now
                    # The stream ended (now, or during that beat).
                    self._ended.clear()
                    # First the pause (the agents of a restarted leader then also try to
                    # connect at spread times, each from its own point on), then the channel.
                    await asyncio.sleep(self._reconnect)
                    await self._leader_reachable()

    async def _leader_reachable(self) -> None:
        """Wait until the channel is connected to the leader (at once if it is: the leader
        ended the stream but is there). A leader that stopped or restarted is reached at
        gRPC's next reconnect attempt after it is back (``reconnect_options``: from 0.5 s,
        growing to an interval), not by calls that fail at once while the channel waits out
        its backoff (a call does not wait for a connection). The caller bounds the wait by the
        interval: a leader that refuses the connection (its TLS) gets the usual heartbeat."""
        channel = self.channel
        try:
            await channel.channel_ready()
        except Exception as exc:  # a channel ``use`` closed meanwhile: the beat uses the new one
            log.debug("heartbeat.channel_wait", error=type(exc).__name__)

    async def close(self) -> None:
        """Stop: the leader is told the stream ends (the node stays online for the offline
        bound from now, long enough for a restart), then the channel closes."""
        await self._finish_stream()
        await self.channel.close(None)
        forgetting = self._forgetting
        if forgetting is not None and not forgetting.done():
            # Before the journal closes; a write under way finishes in its thread.
            forgetting.cancel()
            await asyncio.wait({forgetting}, timeout=CLOSE_SECONDS)
