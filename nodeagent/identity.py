"""The agent's identity: its key, its certificate and the cluster CA, and how it gets them.

First start: make a key (it never leaves the node), fetch the leader's certificate chain over
TLS *without* trusting it, accept it only if it holds a CA whose key matches the configured pin
and that CA issued the leader's certificate; then enrol over TLS verified against that CA with
the join token and a CSR. Later starts: load and check what is on disk.

    DATA/node.key   0600      DATA/node.pem   the node certificate      DATA/ca.pem  the CA

A renewal (``nodeagent.renewal``) keeps its new key in ``DATA/node.key.new`` and certificate
in ``DATA/node.pem.new`` until it moves them into place; ``load_identity`` first completes one
that a crash cut short (``finish_pending``). A certificate past its end is refused with one
line saying to check the node's clock first, then how to enrol the node again
(``expired_message``). Enrolling again keeps the node's key: an agent that has a join token and
a certificate that has ended enrols ``DATA/node.key`` again (``nodeagent.runtime``; that key
refused, a renewal's key in ``DATA/node.key.new``, which the leader may have on record:
``enrol``), and keeps the ended certificate as ``DATA/node.pem.ended`` (``ended_path``); the
leader takes the key it has on record for the node with a token made for the node after its
enrolment, with no
``tlsroll nodes remove`` (which revokes the node's certificates, its served one too: it is for a
lost or stolen machine).

What only the admin can put right exits 2 (a ``ConfigError``, which the unit does not restart)
with one line naming the file and the way on: a key others can read (``check_key_file``), a
file that is damaged (``damaged_file``), a certificate not of the node's key, not issued by the
pinned CA, for other names than ``[node]`` or without the node's cluster identity
(``not_this_nodes``), a CA file not of
``[leader].ca_pin`` (``not_the_pinned_ca``: a wrong pin or a replaced file, never answered by
enrolling again). The files are judged before anything reads or moves them
(``check_identity_files``; a damaged key while a renewal's certificate waits: ``finish_pending``
moves nothing). At enrolment, a leader whose TLS chain holds the pinned CA with a server
certificate it did not issue, or the pin of a certificate that is no CA, or whose answer
carries another CA, is one too (``pin_mismatch``: a wrong pin or a man in the middle; a
restart would dial it again every few seconds): its line gives the pin found and the one
configured. A chain with no certificate of the pinned key at all (a load balancer's default
certificate while it fails over, or a wrong pin) is tried again for about a quarter of an hour
(``PinNotShown``, ``next_pin_wait``; counted from the first such answer across the agent's
restarts, ``DATA/pin.unseen.json``, until a join port shows the pin: ``enrol`` removes it), then
is that exit 2, its warnings and line saying so where the chain looks like a proxy's or an
incomplete one (``chain_hint``); a leader not reached stays a TransientError (retried, then
exit 1).
"""

from __future__ import annotations

import _ssl
import datetime as dt
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodeagent.config import AgentConfig

# The pieces the crypto worker's child needs too (``certwork_ops.renew_install``), kept where it
# imports them without this module's (the config, TLS, logging): ``nodeagent.nodefiles``.
from nodeagent.nodefiles import CertificateExpired as CertificateExpired  # noqa: PLC0414
from nodeagent.nodefiles import EnrolmentDeferred as EnrolmentDeferred  # noqa: PLC0414
from nodeagent.nodefiles import EnrolmentRefused as EnrolmentRefused  # noqa: PLC0414
from nodeagent.nodefiles import LeaderFailed as LeaderFailed  # noqa: PLC0414
from nodeagent.nodefiles import PinNotShown as PinNotShown  # noqa: PLC0414
from nodeagent.nodefiles import check_issued as check_issued  # noqa: PLC0414
from nodeagent.nodefiles import (
    crl_kind_problem,
    forget_pin_unseen,
    keep_enrolment_interval,
    refused_ca_kind_problem,
)
from nodeagent.nodefiles import install_renewed as install_renewed  # noqa: PLC0414
from nodeagent.nodefiles import paths as paths  # noqa: PLC0414
from nodeagent.nodefiles import pending_paths as pending_paths  # noqa: PLC0414
from tlsroll import __version__, logs, spiffe, tls
from tlsroll.echo import shown_path
from tlsroll.errors import (
    ConfigError,
    NotRegularFile,
    PKIError,
    PKIReason,
    TerminalError,
    TlsrollError,
    TransientError,
    UnsafePermissions,
    os_error_text,
)
from tlsroll.fsutil import (
    PUBLIC,
    check_private_file,
    file_kind,
    fsync_dir,
    make_private_dir,
    read_regular,
    write_atomic,
)
from tlsroll.names import Names, utcnow

if TYPE_CHECKING:
    from cryptography import x509

    from tlsroll import pki


log = logs.get_logger(__name__)

# grpc.StatusCode names worth trying again; everything else is the leader saying no, except a
# RESOURCE_EXHAUSTED that carries the join port's ``retry-after`` (``told_wait``) and the
# leader failing to answer (``LEADER_FAILED``).
TRANSIENT = {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
# A call the leader did not decide but failed at (a bug of its: INTERNAL, UNKNOWN; a call cut
# off: ABORTED, CANCELLED, DATA_LOSS): no verdict on this node's token, key or names, so no
# refusal (``EnrolmentRefused``: exit 6, which the unit does not restart) but exit 1, which
# it does: the leader mended, the restarted agent enrols.
LEADER_FAILED = {"INTERNAL", "UNKNOWN", "ABORTED", "CANCELLED", "DATA_LOSS"}

# The revision of this module's checks of the node's files (``load_identity``, ``check_issued``
# and what they call): bump it with any change of what they accept, so that the memo of an
# earlier check (``certwork.MEMO``, keyed to it) is not trusted by a stricter version.
IDENTITY_CHECKS = 1

# The longest wait the agent takes from the join port at once: the join guard's own cap
# (``leader.join_guard.GuardPolicy.cap``); a larger value is read as this.
LONGEST_TOLD_WAIT = 300


def told_wait(trailers: Any) -> int | None:
    """The whole seconds of the join port's ``retry-after`` in gRPC trailing metadata (1 to
    ``LONGEST_TOLD_WAIT``), or None when it sent none or nothing readable: then a
    RESOURCE_EXHAUSTED is gRPC's own (a message over its size limit), which waiting does not
    cure."""
    try:
        values = [str(v) for k, v in trailers or () if k == "retry-after"]
    except (TypeError, ValueError):  # not key/value pairs: none sent that can be read
        return None
    seconds = [int(v) for v in values if v.isascii() and v.isdigit() and len(v) <= 9]
    if not seconds:
        return None
    return min(max(1, *seconds), LONGEST_TOLD_WAIT)


@dataclass(frozen=True)
class Identity:
    """The node's files and what the agent needs to know of them while it serves: the
    certificate's validity (renewal, status) and the cluster's trust domain. Held as plain
    values, so that a serving agent never parses X.509 (``cryptography`` costs it about 10 MiB
    for months, issue 15); ``cert`` (the certificate this identity was checked with, kept as
    PEM) and ``ca`` are parsed where certificate work needs them (the checks' children,
    ``certwork`` and ``cryptoworker``; tests), never in the agent."""

    key_file: Path
    cert_file: Path
    ca_file: Path
    not_before: dt.datetime
    not_after: dt.datetime
    trust_domain: str
    checked_pem: bytes = field(repr=False, compare=False, default=b"")

    @classmethod
    def of(
        cls,
        key_file: Path,
        cert_file: Path,
        ca_file: Path,
        cert: x509.Certificate,
        ca: x509.Certificate,
    ) -> Identity:
        from tlsroll import pki  # noqa: PLC0415 - certificate work only (see the docstring)

        return cls(
            key_file,
            cert_file,
            ca_file,
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
            spiffe.trust_domain(ca),
            pki.cert_to_pem(cert),
        )

    @property
    def cert(self) -> x509.Certificate:
        from tlsroll import pki  # noqa: PLC0415 - certificate work only (see the docstring)

        return (
            pki.load_cert_pem(self.checked_pem)
            if self.checked_pem
            else pki.read_cert(self.cert_file)
        )

    @property
    def ca(self) -> x509.Certificate:
        from tlsroll import pki  # noqa: PLC0415 - certificate work only (see the docstring)

        return pki.read_cert(self.ca_file)

    @property
    def key_pem(self) -> bytes:
        return read_regular(self.key_file)

    @property
    def cert_pem(self) -> bytes:
        return read_regular(self.cert_file)

    @property
    def ca_pem(self) -> bytes:
        return read_regular(self.ca_file)


def load_identity(cfg: AgentConfig, now: dt.datetime | None = None) -> Identity | None:
    """The identity on disk, checked; None if the node has not enrolled yet;
    CertificateExpired if its certificate has ended (at ``now``)."""
    from tlsroll import pki  # noqa: PLC0415 - certificate work only (see ``Identity``)

    key_file, cert_file, ca_file = paths(cfg.data_dir)
    check_identity_files(cfg)  # before anything reads a key or moves a file (finish_pending)
    if cfg.data_dir.exists():
        try:
            finish_pending(cfg.data_dir)
        except PKIError as exc:  # node.key damaged while a renewal's certificate waits
            raise damaged_file(cfg, key_file, exc) from None
    if not (key_file.exists() and cert_file.exists() and ca_file.exists()):
        return None
    try:
        key = pki.read_key(key_file)
    except PKIError as exc:
        raise damaged_file(cfg, key_file, exc) from None
    try:
        cert = pki.read_cert(cert_file)
    except PKIError as exc:
        raise damaged_file(cfg, cert_file, exc) from None
    try:
        ca = pki.read_cert(ca_file)
    except PKIError as exc:
        raise damaged_file(cfg, ca_file, exc) from None
    if pki.spki_pin(ca) != cfg.ca_pin:
        raise not_the_pinned_ca(cfg, pki.spki_pin(ca))
    try:
        check_issued(cert, key, ca, cfg.names)
    except PKIError as exc:
        raise not_this_nodes(cfg, exc, pki.names_of(cert)) from None
    if spiffe.of(cert) != spiffe.node(spiffe.trust_domain(ca), cfg.node_name):
        raise not_this_nodes(cfg, None, pki.names_of(cert))
    now = now or utcnow()
    if now >= cert.not_valid_after_utc:
        raise CertificateExpired(expired_message(cfg, cert.not_valid_after_utc, now))
    return Identity.of(key_file, cert_file, ca_file, cert, ca)


def check_identity_files(cfg: AgentConfig) -> None:
    """Judge the node's files before anything reads them: its key and a renewal's
    (``check_key_file``: not a regular file, not ours or readable by others), its certificate
    and CA (a regular file: a FIFO would be read for ever), and the record of a refused CA
    certificate (``nodefiles.refused_ca_kind_problem``: read once the agent serves, review
    rev50a L2), and the revocation list's place, which the agent writes over (a directory
    there: ``nodefiles.crl_kind_problem``, review rev51d M1). All a person's to fix (exit 2).
    Before ``finish_pending`` (which reads the keys and moves files) and the memo's digest
    (``certwork``, which reads them all): a refusal reads nothing and changes nothing."""
    key_file, cert_file, ca_file = paths(cfg.data_dir)
    for secret in (key_file, pending_paths(cfg.data_dir)[0]):
        if secret.exists():
            check_key_file(secret)
    for public in (cert_file, ca_file, pending_paths(cfg.data_dir)[1]):
        try:
            st = os.stat(public)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{public} is not a regular file ({file_kind(st.st_mode)})")
    for kind_problem in (refused_ca_kind_problem, crl_kind_problem):
        if (problem := kind_problem(cfg.data_dir)) is not None:
            raise problem


def check_key_file(key_file: Path) -> None:
    """``check_private_file`` of the node's key, a key others can read or that is not ours a
    config error (exit 2, which the unit does not restart: restarting changes nothing; before,
    it exited 1 and was started again every few seconds for ever). Its line names the file and
    the fix (``chmod 600 FILE``)."""
    try:
        check_private_file(key_file)
    except UnsafePermissions as exc:
        raise ConfigError("node key", None, str(exc)) from None


def damaged_file(cfg: AgentConfig, path: Path, exc: PKIError) -> ConfigError:
    """The node's key, certificate or CA file that cannot be read by its content (damaged, a
    key of a type not taken or under a passphrase): a config error (exit 2), one line naming
    the file and the way back: move it aside and enrol again (its certificate or CA: with a
    token made for the node, its key enrolled again; its key: a new key, once the node is
    removed on the leader, as for a revoked key)."""
    key_file, cert_file, _ = paths(cfg.data_dir)
    token, where = _token_way(cfg)
    if path == key_file:
        what = "node key"
        way = (
            f"move it aside (`mv {path} {path}.damaged`), on the leader `tlsroll nodes remove "
            f"{cfg.node_name}` if `tlsroll nodes` lists it (it revokes the node's "
            f"certificates, its served one too) and {token}, {where}, then start the agent "
            "again: it makes a new key and enrols it"
        )
    else:
        what = "node certificate" if path == cert_file else "CA certificate"
        way = (
            f"move it aside (`mv {path} {path}.damaged`), on the leader {token}, {where}, then "
            f"start the agent again: it enrols {key_file} again"
        )
    return ConfigError(what, None, f"{path}: {exc}; {way}")


def _token_way(cfg: AgentConfig) -> tuple[str, str]:
    """The ``tlsroll token create`` for this node (quoted) and where its token goes."""
    return f"`{token_command(cfg.node_name, cfg.addresses, cfg.dns_names)}`", _token_goes(
        cfg, "the token"
    )


def _token_goes(cfg: AgentConfig, it: str) -> str:
    """Where a new token for this node goes, ``it`` naming the token: the agent's
    ``join_token_file``, which must be the agent's alone (``read_token``: "write it to FILE"
    alone had an admin's ``echo TOKEN > FILE``, mode 0644 by the usual umask, refused at the
    agent's next start, the token readable by all meanwhile; session 73), else the config."""
    if cfg.join_token_file is None:
        return f"give {it} to this agent ([leader].join_token_file in {cfg.path})"
    return (
        f"write {it} to {shown_path(cfg.join_token_file)} (mode 600: the agent refuses a token "
        "file others can read)"
    )


def _said_names(names: Names) -> str:
    return f"node {names.common_name!r} with {', '.join((*names.ips, *names.dns)) or 'no names'}"


def not_the_pinned_ca(cfg: AgentConfig, pin: str) -> ConfigError:
    """``DATA/ca.pem`` whose key is not ``[leader].ca_pin``'s: a config error (exit 2), never
    answered by enrolling again. Either the pin is wrong (typed wrong, another cluster's) or
    the file was replaced, perhaps by someone who wants the node to trust their CA: the line
    says both and how to tell them apart (the leader's ``tlsroll ca show``), and not to take
    the file's pin. A third case is no attack: the node joined another cluster (the join
    script writes the new pin and keeps the data dir, review rev50a M1): its three identity
    files are the old cluster's and go aside together, the agent then enrolling with its
    token. For a replaced file, the leader's CA (``ca show --json``'s ``certificate_pem``)
    goes back in its place."""
    key, cert, ca_file = paths(cfg.data_dir)[:3]
    return ConfigError(
        cfg.path,
        "[leader].ca_pin",
        f"{ca_file} holds a CA whose key's pin is {pin}, not this pin: compare this pin with "
        "the one `tlsroll ca show` prints on the leader; if they differ, this pin is wrong; "
        "if they match and this node was joined to another cluster, move "
        f"{key}, {cert} and {ca_file} aside together and start the agent with a join token "
        "(it enrols again); otherwise the file was replaced, perhaps by an attacker: put the "
        "leader's CA back (certificate_pem of `tlsroll ca show --json`) and find out how; "
        "never copy that file's pin here",
    )


def not_this_nodes(cfg: AgentConfig, exc: PKIError | None, names: Names) -> ConfigError:
    """``DATA/node.pem`` that is not this node's by the checks of ``check_issued`` (``exc``):
    not of ``DATA/node.key``, not issued by the CA in ``DATA/ca.pem`` (the pinned one: checked
    first), or for other names than ``[node]``; or (``exc`` None) without the node's cluster
    identity (issued by an older tlsroll: its line said to ``nodes remove`` the node, which
    revokes its served certificate too, and is not needed). A config error (exit 2:
    restarting changes nothing), one line naming the files and the way on: the certificate
    moved aside and the node's key enrolled again with a token made for the node (the leader
    takes the key it has on record with a token made after the enrolment, no ``nodes
    remove``); for names, first whether ``[node]`` is what changed."""
    key_file, cert_file, ca_file = paths(cfg.data_dir)
    token, where = _token_way(cfg)
    aside = f"`mv {cert_file} {cert_file}.mismatch`"
    again = f"it enrols {key_file} again"
    if exc is None:
        return ConfigError(
            "node certificate",
            None,
            f"{cert_file} carries no cluster identity for node {cfg.node_name!r} (issued by an "
            f"older tlsroll); move it aside ({aside}), on the leader {token}, {where}, then "
            f"start the agent again: {again}",
        )
    if exc.reason is PKIReason.NAME_MISMATCH:
        return ConfigError(
            cfg.path,
            "[node]",
            f"{cert_file} is for {_said_names(names)}; [node] says {_said_names(cfg.names)}: "
            "if [node] is wrong, put [node] back as the certificate has it and start the agent "
            f"again; if the node's names changed, on the leader {token}, {where}, move the "
            f"certificate aside ({aside}) and start the agent again: {again} with these names",
        )
    if exc.reason is PKIReason.KEY_MISMATCH:
        problem = (
            f"{cert_file} is not the certificate of {key_file} (one of them replaced, or "
            "restored from another copy): if the node's own key was replaced, put it back; "
            f"else move the certificate aside ({aside}), on the leader {token}, {where}, then "
            f"start the agent again: {again} (if the leader says the node is enrolled with "
            "another key, this key is not the node's: its line says the way on)"
        )
    else:
        problem = (
            f"{cert_file} was not issued by the CA in {ca_file} (the CA of [leader].ca_pin): "
            f"another CA's or cluster's certificate; move it aside ({aside}), on the leader "
            f"{token}, {where}, then start the agent again: {again}"
        )
    return ConfigError("node certificate", None, problem)


def fetch_chain(address: str, port: int, timeout: float = 5.0) -> list[x509.Certificate]:
    """The certificate chain a TLS server sends, unverified: to be checked by pin, not trusted."""
    from cryptography import x509  # noqa: PLC0415 - certificate work only (see ``Identity``)

    ctx = tls.unverified_client_context()
    ctx.set_alpn_protocols(["h2"])
    try:
        with tls.connect(ctx, address, port, timeout=timeout) as conn:
            # Public as SSLSocket.get_unverified_chain() from Python 3.13.
            chain = conn._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
    except OSError as exc:
        raise TransientError(
            f"cannot reach the leader at {_hostport(address, port)}: {exc}"
        ) from None
    return [x509.load_der_x509_certificate(c.public_bytes(_ssl.ENCODING_DER)) for c in chain]


PIN_ADVICE = (
    "compare with `tlsroll ca show` on the leader; do not change the pin to this value unless "
    "it matches"
)
"""What a pin found where the configured one was expected says to do (a restart does not heal
a wrong pin nor a man in the middle: exit 2, and the agent dials that endpoint no more)."""


def pin_mismatch(cfg: AgentConfig, found: str) -> ConfigError:
    """``[leader].ca_pin`` not the pin of the CA the leader showed at enrolment (``found``
    says what was found, with its pin): a config error (exit 2: restarted, the agent would dial
    a possibly hostile endpoint every few seconds for ever). Either the pin is wrong or
    something other than the cluster's leader answers (a man in the middle): the line gives
    both pins and the way to tell them apart (``PIN_ADVICE``). Never the join token."""
    return ConfigError(
        cfg.path,
        "[leader].ca_pin",
        f"{found}; configured: {cfg.ca_pin}: either this pin is wrong or something other than "
        f"the cluster's leader answers there (a man in the middle): {PIN_ADVICE}",
    )


def pinned_ca(cfg: AgentConfig, chain: list[x509.Certificate], target: str) -> x509.Certificate:
    """``pki.find_pinned_ca`` of the chain the leader's join port sent (``target``), its
    refusal a config error (``pin_mismatch``, exit 2) that says the pins found: the pin of a
    certificate that is no CA, or a server certificate the pinned CA did not issue; a chain
    with no certificate of ``[leader].ca_pin``'s key at all is ``PinNotShown`` (a
    TransientError carrying that refusal: retried for ``PIN_PATIENCE``, then exit 2). The join
    token was not sent (it goes only over a channel verified against the pinned CA)."""
    from tlsroll import pki  # noqa: PLC0415 - certificate work only (see ``Identity``)

    try:
        return pki.find_pinned_ca(chain, cfg.ca_pin)
    except PKIError as exc:
        cas = [pki.spki_pin(c) for c in chain if pki.is_ca(c)]
        sent = (
            f"its CA's pin is {', '.join(cas)}"
            if cas
            else f"it sent no CA certificate ({len(chain)} certificate(s), the first's pin "
            f"{pki.spki_pin(chain[0]) if chain else 'none'})"
        )
        if exc.reason is PKIReason.NOT_CA:
            found = (
                f"the leader at {target} sent a certificate of this pin that is no CA (the "
                f"pin of a leader's own key, not of the cluster CA's?); {sent}"
            )
        elif exc.reason is PKIReason.UNTRUSTED:
            found = (
                f"the leader at {target} sent this pin's CA with a server certificate that CA "
                f"did not issue ({sent})"
            )
        else:
            found = f"the leader at {target} sent no CA of this pin: {sent}"
        hint = chain_hint(cfg.ca_pin, chain) if exc.reason is PKIReason.PIN_MISMATCH else ""
        found = f"{found}; {hint}" if hint else found
        refusal = pin_mismatch(cfg, f"{found}; the join token was not sent")
        if exc.reason is PKIReason.PIN_MISMATCH:
            # No certificate of the pinned key at all: a balancer's default certificate while
            # it fails over looks so (review rev50e), as does a wrong pin: tried again for a
            # while, then this refusal (``PinNotShown``). A certificate of the pinned key that
            # is no CA, or the pinned CA beside a server certificate it did not issue, is
            # someone showing this pin's key: no fail-over does that, refused at once.
            raise PinNotShown(refusal, tuple(pki.spki_pin(c) for c in chain), hint) from None
        raise refusal from None


PROXY_HINT = (
    "the port sends a certificate issued by {issuer} without the CA's certificate (a proxy "
    "that terminates TLS, or an incomplete chain?)"
)


def chain_hint(pin: str, chain: list[x509.Certificate]) -> str:
    """What a chain holding no certificate of the key ``pin`` suggests (``PROXY_HINT``), or "":
    its first certificate names this pin's cluster (its cluster identity's trust domain is the
    pin's, ``spiffe.trust_domain_of_pin``: the leader's certificate, or another the cluster CA
    issued) and no certificate sent issued it: a proxy that terminates TLS with such a
    certificate, or a server that does not send its chain (review rev51e L4). A hint and no
    more: before its enrolment the node knows the CA by its key's pin alone, so whether that
    CA signed it cannot be checked (nor its issuer's name or key identifier compared with the
    CA's); the pin's refusal stands. The issuer's name is said as ``peertext.clean`` makes it."""
    from cryptography import x509  # noqa: PLC0415 - certificate work only (see ``Identity``)

    from tlsroll import peertext, pki  # noqa: PLC0415

    if not chain:
        return ""
    leaf = chain[0]
    try:
        ours = spiffe.of(leaf)
        if ours is None or ours.trust_domain != spiffe.trust_domain_of_pin(pin):
            return ""
        if any(pki.issued_by(leaf, c) for c in chain):  # its issuer sent (or self-signed)
            return ""
        issuer = peertext.clean(leaf.issuer.rfc4514_string(), 120)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        return ""  # a certificate whose names cannot be read: no hint
    return PROXY_HINT.format(issuer=issuer or "an issuer without a name")


def _hostport(address: str, port: int) -> str:
    from tlsroll.rpc import hostport  # noqa: PLC0415 - see ``enrol``

    return hostport(address, port)


def read_token(cfg: AgentConfig) -> str:
    """The join token, from the config or the file it names. The file's path is said with
    ``shown_path``: a token written into ``join_token_file`` itself (for ``join_token``) is
    never repeated, and such a file, missing, is a config error (exit 2, as README says of a
    file the config names), not a failure the unit restarts on (review s48rev3 M2)."""
    if cfg.join_token:
        return cfg.join_token
    if cfg.join_token_file:
        where = shown_path(cfg.join_token_file)
        token: str | None
        try:
            check_private_file(cfg.join_token_file)
            token = read_regular(cfg.join_token_file).decode().strip()
        except UnsafePermissions as exc:  # exit 2, not restarted for ever (as the key's)
            problem = str(exc).replace(str(cfg.join_token_file), where)
            raise ConfigError(cfg.path, "[leader].join_token_file", problem) from None
        except FileNotFoundError:
            raise ConfigError(
                cfg.path,
                "[leader].join_token_file",
                f"{where}: no such file; it must hold the join token (a token goes in the "
                "file, or in join_token)",
            ) from None
        except OSError as exc:
            raise TerminalError(f"cannot read {where}: {exc.strerror}") from None
        except UnicodeDecodeError:  # the message named a byte and not the file (audit s34 L3)
            token = None
        if token:
            return token
        # Exit 2, as for a missing file: only a person can fix it, and exit 1 had the unit
        # start the agent again every 2 s for ever (review s66 walk L2).
        raise ConfigError(
            cfg.path,
            "[leader].join_token_file",
            f"{where} is {'empty' if token == '' else 'not UTF-8 text'}; it must hold the join "
            "token (a token goes in the file, or in join_token)",
        )
    raise TerminalError(
        f"{cfg.path}: [leader].join_token: missing; this node is not enrolled yet and needs "
        "a join token (on the leader: tlsroll token create --node NAME --address IP)"
    )


def no_token_in(path: Path) -> bool:
    """Whether the join token file ``path`` holds no token: missing, or empty. A file that
    cannot be read otherwise (its mode, not UTF-8, no regular file: a FIFO blocked the start
    for ever, review rev50a L2) is left to ``read_token`` to say so."""
    try:
        return not read_regular(path).strip()
    except FileNotFoundError:
        return True
    except (OSError, NotRegularFile):
        return False


def enrol(cfg: AgentConfig, timeout: float = 10.0) -> Identity:
    """Enrol with the leader once; TransientError when it is worth trying again.

    The key offered is ``DATA/node.key`` (a new one on a first enrolment). An enrolment again
    whose key the leader refuses while a renewal's key waits in ``DATA/node.key.new`` offers
    that key next, in the same call: the leader may have signed that renewal and recorded its
    key, the answer never reaching the node (review s47rev1 L1; the leader said "already
    enrolled with another key" and the node was told to ``nodes remove`` it; after an answer
    to the enrolment itself was lost, "join token already used up", as only the key it
    enrolled replays it). A refused offer spends no use of the token (the leader's
    transaction writes nothing). Enrolled with
    the renewal's key, the node moves it into place as a renewal does (``install_renewed``:
    the certificate beside the key, then the key, then the certificate, each a rename), so a
    kill at any step leaves either the old files (enrol again: the same token replays the
    enrolment, no use spent) or a pair that ``finish_pending`` completes at the next start."""
    # Imported here: the identity check at every start (in ``certwork``'s child) needs none.
    import grpc  # noqa: PLC0415

    from tlsroll import pki  # noqa: PLC0415 - certificate work only (see ``Identity``)
    from tlsroll.rpc import hostport  # noqa: PLC0415
    from tlsroll.v1 import enrolment_pb2, enrolment_pb2_grpc  # noqa: PLC0415

    token = read_token(cfg)
    make_private_dir(cfg.data_dir)
    key_file, cert_file, ca_file = paths(cfg.data_dir)
    pending = pending_paths(cfg.data_dir)[0]
    key: pki.PrivateKey | None = None
    if key_file.exists():  # a key from an earlier, interrupted attempt: keep the identity
        check_key_file(key_file)
        try:
            key = pki.read_key(key_file)
        except PKIError as exc:  # exit 2 with the way on, as at the check (``load_identity``)
            raise damaged_file(cfg, key_file, exc) from None
    target = hostport(cfg.leader_address, cfg.join_port)
    # The pin first, before a key is made: a refusal (exit 2) leaves the node's files as
    # they were, and the token never leaves the node.
    chain = fetch_chain(cfg.leader_address, cfg.join_port, timeout)
    ca = pinned_ca(cfg, chain, target)
    # The join port showed the pinned key: the patience for one that shows it not starts
    # afresh next time (``nodeagent.runtime.PinUnseen``; review rev51e L1).
    forget_pin_unseen(cfg.data_dir)
    if key is None:
        key = pki.generate_key()
        pki.write_key(key_file, key)
        # A renewal's key left by the node's earlier identity (its node.key moved aside, as
        # for a revoked key): never offered, nor renewed, in the new one's name.
        pending.unlink(missing_ok=True)
    creds = grpc.ssl_channel_credentials(root_certificates=pki.cert_to_pem(ca))
    # The target name is the leader's internal name: only the leader's certificate has it, so
    # a node's certificate served on the leader's address cannot take the join token.
    leader_host = spiffe.leader_host(spiffe.trust_domain(ca))
    options = [("grpc.ssl_target_name_override", leader_host)]
    with grpc.secure_channel(target, creds, options=options) as channel:
        stub = enrolment_pb2_grpc.EnrolmentStub(channel)

        def offer(key: pki.PrivateKey) -> enrolment_pb2.EnrolResponse:
            reply: enrolment_pb2.EnrolResponse = stub.Enrol(
                enrolment_pb2.EnrolRequest(
                    token=token,
                    csr_pem=pki.csr_to_pem(pki.make_csr(key, cfg.names)),
                    node_name=cfg.node_name,
                    addresses=list(cfg.names.ips),
                    dns_names=list(cfg.names.dns),
                    agent_version=__version__,
                    agent_port=cfg.port,
                    names_apart=True,  # ``check_issued`` reads them there (pki.names_of)
                ),
                timeout=timeout,
            )
            return reply

        renewal_key = False
        try:
            reply = offer(key)
        except grpc.RpcError as exc:
            first = _enrol_error(cfg, target, exc)
            other = _pending_key(pending) if isinstance(first, EnrolmentRefused) else None
            if other is None:
                raise _with_advice(cfg, first) from None
            log.warning(
                "agent.enrolling_with_renewal_key",
                refused=str(first),
                key_file=str(pending),
                detail="the leader refused this node's key; it may have on record the key of a "
                "renewal it signed whose answer never reached the node",
            )
            try:
                reply = offer(other)
            except grpc.RpcError as again:
                second = _enrol_error(cfg, target, again)
                if not isinstance(second, EnrolmentRefused):
                    raise second from None
                also = "" if str(second) == str(first) else f": {second}"
                raise _with_advice(
                    cfg,
                    EnrolmentRefused(f"{first}; {pending} (a renewal's key) was refused too{also}"),
                ) from None
            key, renewal_key = other, True
    cert = pki.load_cert_pem(reply.certificate_pem)
    got_ca = pki.load_cert_pem(reply.ca_certificate_pem)
    if pki.spki_pin(got_ca) != cfg.ca_pin:
        raise pin_mismatch(
            cfg,
            f"the leader at {target} answered the enrolment with a CA whose key's pin is "
            f"{pki.spki_pin(got_ca)}, though its TLS certificate is of this pin's CA (a leader "
            "whose CA was replaced, or not the cluster's leader); neither its certificate nor "
            "its CA was written (the node's key stays, the token is spent: make a new one)",
        )
    check_issued(cert, key, got_ca, cfg.names)
    pki.write_cert(ca_file, got_ca)
    kept = keep_ended(cfg.data_dir)
    if renewal_key:
        install_renewed(cfg.data_dir, cert)
    else:
        pki.write_cert(cert_file, cert)
    try:  # (the agent's own interval until the leader's first answer, as before, if not kept)
        keep_enrolment_interval(cfg.data_dir, reply.heartbeat_interval_seconds)
    except OSError as exc:
        log.warning(
            "agent.leader_interval_not_kept",
            error=os_error_text(exc)[:200],
            detail="the agent could not save the leader's heartbeat interval to its data dir; "
            "it learns it from the leader's first answer",
        )
    log.info(
        "agent.enrolled",
        node=cfg.node_name,
        cert_fingerprint=pki.fingerprint(cert),
        not_after=cert.not_valid_after_utc.isoformat(),
        key_pin=pki.spki_pin(cert),
        **({"ended_cert_kept": str(kept)} if kept else {}),
        **({"key_from": str(pending)} if renewal_key else {}),
    )
    return Identity.of(key_file, cert_file, ca_file, cert, got_ca)


def _with_advice(cfg: AgentConfig, refused: TlsrollError) -> TlsrollError:
    """``refused`` with the way to a new key after it if the leader refused the node's key for
    good (``NEW_KEY``: at a first enrolment and at an enrolment again alike), else as it is."""
    said = str(refused)
    if not isinstance(refused, EnrolmentRefused) or NEW_KEY not in said:
        return refused
    return EnrolmentRefused(f"{said}; {refused_key_advice(cfg, said)}")


def _pending_key(path: Path) -> pki.PrivateKey | None:
    """The key a renewal left at ``path`` (``DATA/node.key.new``), or None (none, unreadable)."""
    from tlsroll import pki  # noqa: PLC0415 - certificate work only (see ``Identity``)

    try:
        check_private_file(path)
        return pki.read_key(path)
    except (OSError, PKIError, TlsrollError):
        return None


def ended_path(data_dir: Path) -> Path:
    """Where an enrolment again keeps the node's certificate that had ended."""
    return data_dir / "node.pem.ended"


def keep_ended(data_dir: Path, now: dt.datetime | None = None) -> Path | None:
    """Copy the node's certificate to ``ended_path`` if it has ended (at ``now``), before an
    enrolment again writes the new one over it; the path, or None (no certificate, or one not
    ended, or unreadable: written over, as before). A copy, not a move: ``DATA/node.pem`` is
    never missing, and the new one replaces it in one rename."""
    from tlsroll import pki  # noqa: PLC0415 - certificate work only (see ``Identity``)

    cert_file = paths(data_dir)[1]
    try:
        pem = read_regular(cert_file)  # never a FIFO's endless read
        ended = (now or utcnow()) >= pki.load_cert_pem(pem).not_valid_after_utc
    except (OSError, PKIError, ValueError, NotRegularFile):
        return None
    if not ended:
        return None
    write_atomic(ended_path(data_dir), pem, PUBLIC)
    return ended_path(data_dir)


# How long an agent goes on trying to enrol: ``ENROL_PATIENCE`` seconds while the leader cannot
# be reached (then it exits, and its service manager starts it again); while the join port
# tells it to wait, as long as ``TOLD_PATIENCE`` seconds.
ENROL_PATIENCE = 60.0
TOLD_PATIENCE = 900.0


def next_enrol_wait(
    exc: TransientError, failures: int, elapsed: float, told_elapsed: float, jitter: float
) -> float | None:
    """Seconds to wait before the next enrolment attempt after ``exc``, or None to give up.
    ``failures``: untold transient errors in a row; ``elapsed``: seconds since they began (since
    the join port's last wait, which proved the leader reachable); ``told_elapsed``: seconds
    since the first attempt. A wait the join port asked for is taken as told, stretched by up
    to a quarter (``jitter`` in [0, 1]) so that nodes told the same wait at once do not all come
    back at once; other transient errors wait 0.2 s, doubling, at most 5 s."""
    if isinstance(exc, EnrolmentDeferred):
        wait = exc.retry_after * (1 + 0.25 * jitter)
        return wait if told_elapsed + wait <= TOLD_PATIENCE else None
    if elapsed >= ENROL_PATIENCE or told_elapsed >= TOLD_PATIENCE:
        return None
    return min(5.0, 0.2 * 2.0 ** min(failures - 1, 10))


# How long an agent goes on trying a join port whose chain holds no certificate of the pinned
# key (``PinNotShown``: a load balancer's default certificate during a fail-over, or a wrong
# pin), counted from the first such answer: about a quarter of an hour; tried again after
# ``PIN_WAITS`` seconds, then every ``PIN_WAIT_EVERY``, each stretched by up to a quarter, the
# last cut to end at the patience; the try past it stops the agent (exit 2, the pin's line).
PIN_PATIENCE = 900.0
PIN_WAITS = (30.0, 60.0, 120.0)
PIN_WAIT_EVERY = 300.0


def next_pin_wait(
    failures: int, elapsed: float, jitter: float, patience: float = PIN_PATIENCE
) -> float | None:
    """Seconds to wait before trying again a join port that showed no certificate of the pinned
    key ``failures`` times (1 or more) since ``elapsed`` seconds ago, or None to give up (the
    refusal: exit 2). ``jitter`` in [0, 1] stretches the wait by up to a quarter, so that the
    nodes behind one balancer do not all come back at once. ``patience`` below
    ``PIN_PATIENCE`` (tests only: ``runtime.pin_patience``) shortens every wait in proportion."""
    if elapsed >= patience:
        return None
    scale = patience / PIN_PATIENCE
    base = PIN_WAITS[failures - 1] if 0 < failures <= len(PIN_WAITS) else PIN_WAIT_EVERY
    return min(base * scale * (1 + 0.25 * jitter), patience - elapsed)


def _enrol_error(cfg: AgentConfig, target: str, exc: Any) -> TlsrollError:
    """What a failed ``Enrol`` call means for the agent: try again soon (TRANSIENT), wait
    as the join port said (``EnrolmentDeferred``), stop with one line and be started again (the
    leader failed: ``LEADER_FAILED``, ``LeaderFailed``, exit 1), or stop with one line for a
    person to act (``EnrolmentRefused``: a new token, a new key, the names or the agent's
    release)."""
    code, detail = exc.code(), " ".join(str(exc.details() or "").split())[:300]
    if code.name in TRANSIENT:
        return TransientError(f"enrolment at {target}: {detail or code.name}")
    if code.name in LEADER_FAILED:
        return LeaderFailed(
            f"the leader at {target} failed to answer the enrolment: {detail or 'no detail'} "
            f"({code.name}); its log says why"
        )
    if code.name == "RESOURCE_EXHAUSTED":
        wait = told_wait(exc.trailing_metadata())
        if wait is not None:
            return EnrolmentDeferred(f"enrolment at {target}: {detail}", wait)
        return EnrolmentRefused(
            f"the leader refused enrolment: {detail or 'no detail'} (RESOURCE_EXHAUSTED without "
            "a retry-after, so not the join port's wait: the request is too large for it; check "
            f"[leader].join_token and the names under [node] in {cfg.path})"
        )
    return EnrolmentRefused(f"the leader refused enrolment: {detail} ({code.name})")


def expired_message(
    cfg: AgentConfig, not_after: dt.datetime, now: dt.datetime, *, running: bool = False
) -> str:
    """The one line for a certificate past its end by this node's clock (``now``): the clock
    first (an RTC wrong at boot, a VM resumed, ``date -s``: correcting it is the fix, and
    enrolling again is not needed), then how to enrol again: with the node's own key, by a new
    token (``reenrol_advice``). ``running``: the agent goes on by itself once the clock is right
    (the renewer looks again); at start, it has to be started again."""
    cert = paths(cfg.data_dir)[1]
    then = "the agent goes on by itself" if running else "start the agent again"
    return (
        f"node certificate {cert} expired {not_after:%Y-%m-%d %H:%M:%S} UTC by this node's "
        f"clock, which reads {now:%Y-%m-%d %H:%M:%S} UTC: check that clock first — if it is "
        f"ahead, correct it and {then} (the certificate is still valid then; do not enrol "
        "again); if the clock is right, the node was offline past the certificate's end and "
        f"cannot renew it: {reenrol_advice(cfg, running=running)}"
    )


def token_command(name: str, addresses: tuple[str, ...], dns_names: tuple[str, ...]) -> str:
    """The ``tlsroll token create`` that makes a token for exactly this node's names (the
    leader enrols a token's node only with the names the token names)."""
    words = [f"--address {a}" for a in addresses] + [f"--dns {d}" for d in dns_names]
    return " ".join([f"tlsroll token create --node {name}", *words])


def reenrol_advice(cfg: AgentConfig, *, running: bool = False) -> str:
    """How a node whose certificate has ended enrols again, keeping its key: a new token, given
    to the agent, which enrols the key again at its next start (``runtime.obtain_identity``).
    No ``nodes remove``: that revokes every certificate of the node (the one its server serves
    too) and is refused while a rollout holds the node; it is for a lost or stolen machine."""
    where = _token_goes(cfg, "it")
    start = "restart the agent" if running else "start the agent again"
    return (
        "enrol it again with its own key, no `tlsroll nodes remove` needed — on the leader "
        f"`{token_command(cfg.node_name, cfg.addresses, cfg.dns_names)}`, {where} and {start}: "
        f"it enrols {paths(cfg.data_dir)[0]} again and keeps the ended certificate as "
        f"{ended_path(cfg.data_dir)} (if its certificate was revoked, the leader refuses that "
        "key and says how to enrol a new one)"
    )


NEW_KEY = "enrol the node with a new key"
"""What every refusal of the node's key by the leader says (``leader.store.NEW_KEY``): a key
whose certificate was revoked (``tlsroll ca revoke``, ``tlsroll nodes remove``), or another
node's. The leader refuses it for good, under any name and by any token."""

REMOVE_FIRST = "tlsroll nodes remove"
"""What such a refusal says when the node is still on record with that key (its certificate
revoked by ``tlsroll ca revoke``): removed first, which spends its tokens."""


def refused_key_advice(cfg: AgentConfig, said: str) -> str:
    """The way on after the leader refused the node's key (``said`` holds ``NEW_KEY``): with a
    new key, which the agent makes itself at its next start once ``DATA/node.key`` is moved
    aside. Not made here without being told: the key is the node's identity, and the admin
    decides that the node, and not a copy of it, is the one to come back (review rev-enrol
    H1). The node still on record (``REMOVE_FIRST`` in ``said``): ``revoked_key_advice``."""
    if REMOVE_FIRST in said:
        return revoked_key_advice(cfg)
    key_file = paths(cfg.data_dir)[0]
    return (
        f"here that is `mv {key_file} {key_file}.removed`, then start the agent again: it makes "
        "a new key and enrols it with the same join token (the leader refuses this key for good)"
    )


def revoked_key_advice(cfg: AgentConfig) -> str:
    """How a node on record whose key's certificate was revoked (``tlsroll ca revoke``: a key
    thought stolen) enrols again: with a new key, which the leader takes once the node is
    removed (while the node is on record, it takes only the key on record; that key it never
    takes again, under any name)."""
    key_file = paths(cfg.data_dir)[0]
    where = (
        f"the token to {cfg.join_token_file}"
        if cfg.join_token_file is not None
        else f"the token to this agent ([leader].join_token_file in {cfg.path})"
    )
    return (
        "the leader refuses this key for good; to enrol the node with a new key (the revoked "
        f"one thought stolen) — here `mv {key_file} {key_file}.removed` first, on the leader "
        f"`tlsroll nodes remove {cfg.node_name}` (it revokes the node's certificates, its "
        f"served one too) and `{token_command(cfg.node_name, cfg.addresses, cfg.dns_names)}`, "
        f"{where}, then start the agent again: it makes a new key and enrols it"
    )


# --- files ------------------------------------------------------------------------------------


def finish_pending(data_dir: Path) -> bool:
    """Complete a renewal a crash cut short (see the module docstring); True if a new key is
    still waiting for its certificate (renew at once). A renewal's file that is damaged is
    discarded (the node's own files stand); the node's key damaged, when it must be read (the
    renewal's certificate is not of the renewal's key), is a PKIError, raised with nothing
    moved or removed."""
    from tlsroll import pki  # noqa: PLC0415 - certificate work only (see ``Identity``)

    key_file, cert_file, _ = paths(data_dir)
    new_key, new_cert = pending_paths(data_dir)
    if new_cert.exists():
        try:
            cert = pki.read_cert(new_cert)
            ours = new_key.exists() and pki.key_matches(cert, pki.read_key(new_key))
        except PKIError as exc:  # the renewal's own file damaged: the node's files stand
            log.warning(
                "renewal.pending_discarded",
                path=str(new_cert),
                error=str(exc),
                detail="a half-written renewal was damaged and dropped; the node's certificate "
                "in use stands and the next renewal makes a new one",
            )
            new_cert.unlink()
        else:
            if ours:
                os.replace(new_key, key_file)
                os.replace(new_cert, cert_file)
            # The node's key damaged: raised (PKIError) before anything moves, so that its
            # refusal (``load_identity``: exit 2) leaves every file as it is.
            elif key_file.exists() and pki.key_matches(cert, pki.read_key(key_file)):
                os.replace(new_cert, cert_file)  # the key had been moved already
            else:
                new_cert.unlink()
        fsync_dir(data_dir)
        log.info("renewal.completed_after_restart", node_cert=str(cert_file))
    return new_key.exists()
