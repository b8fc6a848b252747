"""Certificate checks the serving agent needs without holding X.509 code: run in a child.

The agent runs on every node for months. ``cryptography`` costs a process about 10 MiB (its
Rust library with OpenSSL inside, and the Python modules around it), and the agent needs it
only for moments: to check its own key, certificate and CA at start (``identity.load_identity``),
and to enrol once (``identity.enrol``). Those run here, in a short-lived child process
(``CHILD``, about 0.3 s of CPU each), which does exactly the same work with the same
code and answers with the plain values the agent keeps (``Identity``: the certificate's
validity and the trust domain). The checks are as strict
as they were in-process: the child runs the same functions, and their errors come back as the
same classes with the same messages. A restart whose files and config are byte for byte those
a child last checked needs no child (``MEMO`` in the data dir; see ``load_identity``).

The work of a switch (staging: a new key, its CSR, the leader's certificate checked; a
practice's own certificate, ``--cert-dir``; a renewal; the revocation lists the leader sends)
is the agent's crypto worker's (``nodeagent.cryptoworker``, its ops in
``nodeagent.certwork_ops``): one child that serves a switch's calls and stops when idle, so
that the agent never imports ``cryptography`` (issue 15: a switched agent kept it, about 10
MiB, until it restarted). The checks at start and the enrolment stay here, one child each
(as does a revocation list's check where no worker is given: ``load_crl``). Both rebuild a
child's error with ``_error`` from ``_answer_for``'s answer.

Protocol (``CHILD``): one JSON request on stdin ({"op": …}), one JSON answer on stdout ({"ok": …} or
{"error": {"type": …, "message": …}}); anything else (a crash) is a ``NoAnswer`` (a TerminalError)
naming the child's last line of stderr.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tlsroll
from nodeagent.config import AgentConfig
from nodeagent.identity import (
    IDENTITY_CHECKS,
    CertificateExpired,
    EnrolmentDeferred,
    Identity,
    PinNotShown,
    check_identity_files,
    expired_message,
    paths,
    pending_paths,
    told_wait,
)
from nodeagent.workerrors import ERRORS as ERRORS  # noqa: PLC0414
from nodeagent.workerrors import answer_for as _answer_for
from tlsroll import logs
from tlsroll.errors import (
    ConfigError,
    NotRegularFile,
    PKIError,
    PKIReason,
    TerminalError,
    TlsrollError,
    TransientError,
    os_error_text,
    raise_if_local,
)
from tlsroll.fsutil import PRIVATE, read_regular, set_aside, write_atomic
from tlsroll.names import Names, utcnow

if TYPE_CHECKING:
    from nodeagent.cryptoworker import Worker

log = logs.get_logger(__name__)

# Enrolment talks to the leader (a 5 s chain fetch, a 10 s call); a local check takes well
# under a second even on a loaded machine.
TIMEOUT = 60.0

# The child: what a daemon never needs kept out first (``tlsroll.lean``: structlog would import
# rich), then this module's ``main``.
CHILD = "from tlsroll import lean; lean.keep_out(); from nodeagent import certwork; certwork.main()"


class NoAnswer(TerminalError):
    """The child gave no answer (it crashed, or was killed: the kernel's OOM killer, a signal):
    no verdict on what it was to check. Terminal for the agent's start and enrolment, as
    before; a revocation list is checked again (``trust.LeaderTrust.take_crl``)."""


# --- the agent's side -------------------------------------------------------------------------


def load_identity(cfg: AgentConfig, now: dt.datetime | None = None) -> Identity | None:
    """``identity.load_identity(cfg)``, checked in a child: None if not enrolled yet.

    No child when none of the node's files, nor a renewal's, exists (None: what it would
    answer), nor when the files and the config are byte for byte those a child last checked
    (``MEMO``) with the same code (this tlsroll's version, ``IDENTITY_CHECKS``): the checks
    depend on nothing else, except the certificate's end (compared here with ``now``) and the
    files' kinds and the keys' permissions (``identity.check_identity_files``, here first:
    before the memo's digest reads the files)."""
    if not any(p.exists() for p in (*paths(cfg.data_dir), *pending_paths(cfg.data_dir))):
        return None
    check_identity_files(cfg)  # before the memo's digest reads them (a FIFO: for ever)
    if not any(p.exists() for p in pending_paths(cfg.data_dir)):
        remembered = _remembered(cfg)
        if remembered is not None:
            now = now or utcnow()
            if now >= remembered.not_after:
                raise CertificateExpired(expired_message(cfg, remembered.not_after, now))
            return remembered
    facts = _ask({"op": "identity", "config": str(cfg.path), **_logging(cfg)})
    return None if facts is None else _remember(cfg, _identity(cfg, facts))


def enrol(cfg: AgentConfig) -> Identity:
    """``identity.enrol(cfg)`` in a child (TransientError when it is worth trying again;
    ``EnrolmentDeferred`` with the wait when the join port asked for one; ``PinNotShown`` when
    its chain holds no certificate of the pinned key, with the refusal it becomes)."""
    request = {"op": "enrol", "config": str(cfg.path), **_logging(cfg)}
    return _remember(cfg, _identity(cfg, _ask(request)))


# What a child last checked: the digest of everything the identity checks read, and of the
# code that checked (this tlsroll's version and ``IDENTITY_CHECKS``: a memo written by another
# release is not trusted, its checks may have been looser), and the facts.
MEMO = "identity.checked.json"


def _digest(cfg: AgentConfig) -> str:
    h = hashlib.sha256()
    code = (tlsroll.__version__, str(IDENTITY_CHECKS))
    for part in (*code, cfg.ca_pin, cfg.node_name, repr(cfg.names)):
        h.update(part.encode() + b"\0")
    for path in paths(cfg.data_dir):
        h.update(read_regular(path) + b"\0")  # judged first (``check_identity_files``)
    return h.hexdigest()


def _remembered(cfg: AgentConfig) -> Identity | None:
    """What a child last checked (``MEMO``), if it is about these very files and config.
    The memo is a cache: one that is no regular file (a FIFO put there, which blocked the
    start for ever: review rev50a L2) is passed over with a warning, the child checks, and
    its answer is written over it (``_remember``: the rename replaces anything but a
    directory, which is moved aside first: ``_set_aside``)."""
    path = cfg.data_dir / MEMO
    try:
        memo = json.loads(read_regular(path))
    except NotRegularFile as exc:
        _set_aside(path, str(exc))
        return None
    except (OSError, ValueError):
        return None  # none or unreadable: the child checks
    try:
        if memo.get("digest") != _digest(cfg):
            return None
        return _identity(cfg, memo["facts"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # stale: the child checks


_MEMOS_SAID: set[Path] = set()  # directories in a memo's place that could not be moved, said


def _a_directory(path: Path) -> bool:
    """True if ``path`` itself (not a link's target) is a directory."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _set_aside(path: Path, error: str) -> None:
    """The memo ``path``, no regular file (``error`` says what it is), warned of
    (``identity.memo_not_a_file``). A directory there, which the write of the child's answer
    cannot replace, was passed over and warned of at every start (session 51's review): it is
    moved aside (``NAME.not-a-file-TIME``, said as ``kept_as``; nothing in it is lost) so that
    the memo is written again and the next start says nothing. One that cannot be moved is
    said once in the agent's run, with the ``rm`` that ends it (its write is not tried).
    Anything else (a FIFO, a socket) the write replaces."""
    if not _a_directory(path):
        log.warning(
            "identity.memo_not_a_file",
            path=str(path),
            error=error,
            detail="something other than a file stood where the agent's identity memo goes: the "
            "memo's write replaces it",
        )
        return
    try:
        kept = set_aside(path, "not-a-file", utcnow().strftime("%Y%m%dT%H%M%SZ"))
    except OSError as exc:
        if path in _MEMOS_SAID:
            return
        _MEMOS_SAID.add(path)
        log.warning(
            "identity.memo_not_a_file",
            path=str(path),
            error=error,
            detail=f"it could not be moved aside ({os_error_text(exc)}); the identity is"
            f" checked in a child at every start until it is gone: run: rm -r {path}",
        )
        return
    log.warning(
        "identity.memo_not_a_file",
        path=str(path),
        error=error,
        kept_as=str(kept),
        detail=f"moved aside as {kept.name}; the memo is written again",
    )


def _remember(cfg: AgentConfig, identity: Identity) -> Identity:
    facts = {
        "not_before": identity.not_before.isoformat(),
        "not_after": identity.not_after.isoformat(),
        "trust_domain": identity.trust_domain,
        "certificate": identity.checked_pem.decode("ascii"),
    }
    path = cfg.data_dir / MEMO
    if _a_directory(path):  # (an enrolment's: no memo was read before)
        _set_aside(path, f"{path} is not a regular file (a directory)")
        if _a_directory(path):
            return identity  # said, with the ``rm`` that ends it; the write would fail
    try:
        memo = {"digest": _digest(cfg), "facts": facts}
        write_atomic(path, json.dumps(memo).encode(), PRIVATE)
    except OSError as exc:  # the next start checks in a child again: nothing lost
        log.warning(
            "identity.memo_not_written",
            path=str(cfg.data_dir / MEMO),
            error=str(exc),
            detail="the agent could not save its identity memo; the next start checks its files "
            "again, nothing is lost",
        )
    return identity


@dataclass(frozen=True)
class CheckedCrl:
    """A revocation list the CA signed (``check_crl``): its number, its revoked serials, and
    its thisUpdate and nextUpdate (None: not said, a worker of an earlier release's answer,
    or the list has no nextUpdate)."""

    number: int
    revoked: frozenset[int]
    this_update: dt.datetime | None = None
    next_update: dt.datetime | None = None


def _when(value: Any) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(str(value))


def check_crl(pem: bytes, ca_file: Path, worker: Worker | None = None) -> CheckedCrl:
    """``pki.load_crl`` (signed by the CA in ``ca_file``), with the list's dates.

    Checked by the agent's crypto worker (``worker``, from a worker thread of the agent: a
    rotation revokes each node's old certificate, one list per node, sent to every node, and
    one child serves them all, ``cryptoworker.IDLE_SECONDS``); without one (a tool, a test),
    in a child of its own."""
    request = {"pem": pem.decode("ascii", "replace"), "ca_file": str(ca_file)}
    if worker is not None:
        answer = worker.call_blocking("cert.crl", request)
    else:
        answer = _ask({"op": "crl", **request})
    return CheckedCrl(
        int(answer["number"]),
        frozenset(int(s) for s in answer["revoked"]),
        _when(answer.get("this_update")),
        _when(answer.get("next_update")),
    )


def load_crl(pem: bytes, ca_file: Path, worker: Worker | None = None) -> tuple[int, frozenset[int]]:
    """``check_crl``'s number and revoked serials."""
    checked = check_crl(pem, ca_file, worker)
    return checked.number, checked.revoked


def names_request(names: Names) -> dict[str, Any]:
    """The node's names as a crypto worker's request carries them (``certwork_ops.names_of``)."""
    return {"common_name": names.common_name, "ips": list(names.ips), "dns": list(names.dns)}


def _logging(cfg: AgentConfig) -> dict[str, Any]:
    """How the child logs: as the agent does (its stderr goes to the agent's)."""
    return {"log_level": cfg.log_level, "json": not sys.stderr.isatty()}


def _identity(cfg: AgentConfig, facts: dict[str, Any]) -> Identity:
    key_file, cert_file, ca_file = paths(cfg.data_dir)
    return Identity(
        key_file,
        cert_file,
        ca_file,
        dt.datetime.fromisoformat(facts["not_before"]),
        dt.datetime.fromisoformat(facts["not_after"]),
        facts["trust_domain"],
        facts["certificate"].encode("ascii"),
    )


def _ask(request: dict[str, Any]) -> Any:
    # -P: the child (root, checking identities and signatures) never imports from its working
    # directory, whatever that is.
    try:
        done = subprocess.run(
            [sys.executable, "-P", "-c", CHILD],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise TransientError(
            f"certificate check ({request['op']}) took over {TIMEOUT:.0f} s"
        ) from None
    except OSError as exc:  # no child at all: short of descriptors, processes or memory, …
        what = f"starting the certificate check ({request['op']})"
        raise_if_local(exc, what)
        raise TransientError(f"{what}: {' '.join(str(exc).split())}") from None
    if done.stderr:  # the child's log lines (JSON on stderr, as the agent's): the agent's log
        sys.stderr.write(done.stderr)
        sys.stderr.flush()
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        said = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise NoAnswer(
            f"certificate check ({request['op']}) failed (exit {done.returncode}): {said}"
        ) from None
    if "ok" in answer:
        return answer["ok"]
    raise _error(answer["error"])


def _error(err: dict[str, Any]) -> Exception:
    kind, message = err.get("type", ""), str(err.get("message", ""))
    if kind == "PKIError":
        return PKIError(PKIReason(err["reason"]), err.get("detail", ""))
    if kind == "OSError":
        return OSError(err.get("errno") or 0, err.get("strerror") or message, err.get("filename"))
    if kind == "ConfigError":
        return ConfigError(err.get("path", ""), err.get("key"), str(err.get("problem", message)))
    if kind == "PinNotShown":  # a pin not shown: retried, then its refusal (exit 2)
        refusal = ConfigError(err.get("path", ""), err.get("key"), str(err.get("problem", message)))
        pins = tuple(str(p) for p in err.get("pins") or ())
        return PinNotShown(refusal, pins, str(err.get("hint") or ""))
    if kind == "EnrolmentDeferred":  # the join port's wait, bounded again on this side
        wait = told_wait([("retry-after", str(err.get("retry_after", "")))])
        if wait is not None:
            return EnrolmentDeferred(message, wait)
        return TerminalError(f"certificate check (enrol): a wait without its length: {message}")
    return ERRORS.get(kind, TerminalError)(message)


# --- the child's side -------------------------------------------------------------------------


def _facts(identity: Identity) -> dict[str, str]:
    return {
        "not_before": identity.not_before.isoformat(),
        "not_after": identity.not_after.isoformat(),
        "trust_domain": identity.trust_domain,
        "certificate": identity.checked_pem.decode("ascii"),
    }


def _work(request: dict[str, Any]) -> Any:
    from nodeagent import identity  # noqa: PLC0415 - the child's work

    op = request["op"]
    if op == "crl":
        from nodeagent import certwork_ops  # noqa: PLC0415

        return certwork_ops.crl(request)
    cfg = AgentConfig.load(Path(request["config"]))
    if op == "identity":
        found = identity.load_identity(cfg)
        return None if found is None else _facts(found)
    if op == "enrol":
        return _facts(identity.enrol(cfg))
    raise TerminalError(f"unknown certificate work {op!r}")


def main() -> int:
    from tlsroll import logs  # noqa: PLC0415

    try:
        request = json.loads(sys.stdin.read())
        logs.configure(
            json=bool(request.get("json", True)),
            level=logs.level_of(request.get("log_level") or "info"),
        )
        answer: dict[str, Any] = {"ok": _work(request)}
    except (TlsrollError, OSError, ValueError) as exc:
        answer = {"error": _answer_for(exc)}
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
