"""Where the leader keeps its files under its data directory, and how `tlsroll init` makes them.

DATA/leader.toml          the leader's config (written by init, edited by the admin)
DATA/leader.sqlite3       the store (nodes, tokens, rollouts, audit)
DATA/ca/ca.pem            the cluster CA certificate (public)
DATA/ca/ca.key            its key, encrypted with the CA passphrase, 0600
DATA/secrets/ca.passphrase  the CA passphrase when the admin gave none elsewhere, 0600 (the
                          demo's; a server moves it into a systemd credential, see
                          ``passphrase_source``)
DATA/tls/leader.pem       the leader's serving + client certificate, chain with the CA
DATA/tls/leader.key       its key, 0600 (unencrypted: the daemon needs it to start)
DATA/tls/viewer.pem       the web viewer's serving certificate (serverAuth only), chain with
                          the CA; issued by the daemon at start when missing or due
DATA/tls/viewer.key       its key, 0600
DATA/run/admin.sock       the admin socket, in a 0750 directory
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import itertools
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tlsroll.defaults import CONTROL_PORT, JOIN_PORT, LEADER_NAME, VIEWER_PORT
from tlsroll.echo import shown_path
from tlsroll.errors import TerminalError, UnsafePermissions
from tlsroll.fsutil import (
    PRIVATE,
    check_private_dir,
    check_private_file,
    make_private_dir,
    read_regular,
    real_path,
    user_label,
    write_atomic,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from cryptography import x509

    from tlsroll import pki

    # What records a leader certificate as it is issued, before anything is written (the
    # store's ``record_leader_certificate``): `tlsroll ca revoke` of the one served revokes
    # every one on record (``Store.revoke``). A record that fails writes nothing.
    Record = Callable[[x509.Certificate], object]

# Every admin command reads where the admin socket is (``Layout``); the certificate work below
# imports cryptography (some 40 ms) in the functions that do it, not with the module.


# Beside the store until the leader's first start made it (``Layout.first_start``).
FIRST_START = "leader.sqlite3.first-start"


@dataclass(frozen=True)
class Layout:
    data_dir: Path

    @property
    def config(self) -> Path:
        return self.data_dir / "leader.toml"

    @property
    def store(self) -> Path:
        return self.data_dir / "leader.sqlite3"

    @property
    def first_start(self) -> Path:
        """What ``init`` leaves for the leader's first start, which makes the store and removes
        it (``leader.db.mark_store``): without it, a data dir with a CA and neither the store
        nor its ``.created`` mark is a restore that left the store out, not a new cluster."""
        return self.data_dir / FIRST_START

    @property
    def ca_cert(self) -> Path:
        return self.data_dir / "ca" / "ca.pem"

    @property
    def ca_cert_new(self) -> Path:
        """Where a renewed CA certificate waits for its transaction's commit
        (``leader.ca_renewal``)."""
        return self.data_dir / "ca" / "ca.pem.new"

    @property
    def ca_key(self) -> Path:
        return self.data_dir / "ca" / "ca.key"

    @property
    def default_passphrase_file(self) -> Path:
        return self.data_dir / "secrets" / "ca.passphrase"

    @property
    def tls_cert(self) -> Path:
        return self.data_dir / "tls" / "leader.pem"

    @property
    def tls_key(self) -> Path:
        return self.data_dir / "tls" / "leader.key"

    @property
    def viewer_cert(self) -> Path:
        return self.data_dir / "tls" / "viewer.pem"

    @property
    def viewer_key(self) -> Path:
        return self.data_dir / "tls" / "viewer.key"

    @property
    def admin_socket(self) -> Path:
        return self.data_dir / "run" / "admin.sock"


def write_leader_cert(
    layout: Layout,
    ca: pki.CertificateAuthority,
    key: pki.PrivateKey,
    names: pki.Names,
    record: Record | None = None,
) -> x509.Certificate:
    """Issue the leader's certificate for ``key``: its names (apart from the SAN: agents dial
    the leader by its internal name, and no workstation may take it as a server certificate
    for the leader's address, ``pki.NAMES_OID``), its cluster identity (``spiffe://…/leader``)
    and its internal name, serving and client use; recorded (``record``), then written as a
    chain with the CA. Returns it. Its serial is drawn first: the certificate also carries
    it as a name (``spiffe.leader_serial_host``), which agents that learned it dial.
    """
    from cryptography import x509  # noqa: PLC0415 - see the imports

    from tlsroll import pki, spiffe  # noqa: PLC0415 - see the imports

    td = ca.trust_domain
    serial = x509.random_serial_number()
    cert = ca.issue(
        key.public_key(),
        names,
        server=True,
        client=True,
        identity=spiffe.leader(td),
        internal_dns=[spiffe.leader_host(td), spiffe.leader_serial_host(td, serial)],
        names_apart=True,
        serial=serial,
    )
    if record is not None:
        record(cert)
    write_atomic(layout.tls_cert, pki.cert_to_pem(cert) + ca.cert_pem)
    return cert


def write_leader_pair(
    layout: Layout,
    ca: pki.CertificateAuthority,
    key: pki.PrivateKey,
    names: pki.Names,
    record: Record | None = None,
) -> x509.Certificate:
    """``leader.key`` as ``key`` (a new one: 0600 from its first byte, replaced at once) and
    its certificate (``write_leader_cert``). The certificate is recorded before anything is
    written, and the key is written first: a leader stopped in between finds a leader.pem that
    is not leader.key's and issues it again for it (``REISSUED_FOR_KEY``)."""
    from tlsroll import pki  # noqa: PLC0415 - see the imports

    def first(cert: x509.Certificate) -> None:
        if record is not None:
            record(cert)
        pki.write_key(layout.tls_key, key)

    return write_leader_cert(layout, ca, key, names, first)


def rechain_leader_cert(layout: Layout, ca: pki.CertificateAuthority) -> bool:
    """``DATA/tls/leader.pem`` written again as its leaf and the CA certificate in use, unless
    it is that already (``tlsroll ca renew`` replaced the CA certificate: the same key, so
    the leaf chains to the new one unchanged); True if it was written."""
    from tlsroll import pki  # noqa: PLC0415 - see the imports

    chain = pki.load_certs_pem(Path(layout.tls_cert).read_bytes())
    if chain[1:] == [ca.cert]:
        return False
    write_atomic(layout.tls_cert, pki.cert_to_pem(chain[0]) + ca.cert_pem)
    return True


# The leader's own certificates (``leader.pem``, ``viewer.pem``) are issued again by the leader,
# at its start and with every check of the expiry watch, once they end within
# ``own_renew_before``: at least this, ...
LEADER_RENEW_BEFORE = dt.timedelta(days=30)
# ... and, with a longer ``expiry_warning_days``, this long before the expiry watch would warn
# of them (more than the longest ``expiry_check_interval``, a day: a warning seen between two
# checks is never one the next check's renewal removes). Before, they were issued again within
# 30 days whatever the warning's horizon, and with 60 `certs check-expiration` exited 1 for a
# month a year with nothing to do (review s46rt1 L2).
OWN_RENEW_AHEAD = dt.timedelta(days=2)
# ... but at most half of their life before their end (``expiry_warning_days`` may be up to
# 365, and they live ``pki.LEAF_VALIDITY_DAYS``, 397 days: not imported here, see the imports):
# not issued again every month, nor at every start; the watch's horizon for them is cut to
# match (``own_warn_before``).
OWN_RENEW_CAP = dt.timedelta(days=397 / 2)
DEFAULT_WARNING = dt.timedelta(days=30)  # ``expiry_warning_days``' default


def own_renew_before(warning: dt.timedelta) -> dt.timedelta:
    """How long before its end the leader issues its own certificate or the viewer's again,
    given the expiry watch's horizon ``warning`` (``expiry_warning_days``): ``OWN_RENEW_AHEAD``
    before the watch would warn of it, at least ``LEADER_RENEW_BEFORE``, at most
    ``OWN_RENEW_CAP``."""
    return max(LEADER_RENEW_BEFORE, min(warning + OWN_RENEW_AHEAD, OWN_RENEW_CAP))


def own_warn_before(warning: dt.timedelta) -> dt.timedelta:
    """The expiry watch's horizon for the leader's and the viewer's certificates: ``warning``,
    cut so that it comes ``OWN_RENEW_AHEAD`` after the leader issues them again (a warning of
    one is then a renewal that failed, never one the next check makes)."""
    return min(warning, own_renew_before(warning) - OWN_RENEW_AHEAD)


# Why ``ensure_leader_identity`` issued the leader's certificate again (what it returns).
REISSUED_FOR_KEY = "not the certificate of leader.key"
REISSUED_UNUSABLE = "not signed by ca.pem, or not valid yet"
REISSUED_DUE = "due"
REISSUED_IDENTITY = "identity or names changed"
REISSUED_REVOKED = "revoked"


@dataclass(frozen=True)
class Reissued:
    """What ``ensure_leader_identity`` issued: why (``REISSUED_*``), the certificate and its
    key (a new one unless ``reason`` is ``REISSUED_FOR_KEY``: then leader.key's, or the key
    served), and the certificate it replaced."""

    reason: str
    cert: x509.Certificate
    key: pki.PrivateKey
    replaced: x509.Certificate

    @property
    def new_key(self) -> bool:
        return self.reason != REISSUED_FOR_KEY


def new_leader_key(
    layout: Layout,
    ca: pki.CertificateAuthority,
    names: pki.Names,
    now: dt.datetime,
    record: Record | None = None,
) -> pki.PrivateKey | None:
    """A new ``leader.key`` and its certificate (``write_leader_pair``, recorded with
    ``record``), for a leader certificate that was revoked (``tlsroll ca revoke``): the admin
    revokes it for a key that leaked, and a certificate for the same key would give that key
    back all it could do (the leader's certificate is no secret: every handshake shows it).
    Returns the new key, or None (nothing written) if the CA can issue nothing now
    (``reissue_problem``)."""
    from tlsroll import pki  # noqa: PLC0415 - see the imports

    key = pki.generate_key()
    if reissue_problem(ca, key, now) is not None:
        return None
    write_leader_pair(layout, ca, key, names, record)
    return key


def ensure_leader_identity(
    layout: Layout,
    ca: pki.CertificateAuthority,
    names: pki.Names,
    now: dt.datetime | None = None,
    warning: dt.timedelta = DEFAULT_WARNING,
    key: pki.PrivateKey | None = None,
    record: Record | None = None,
) -> Reissued | None:
    """Give the leader's certificate its cluster identity if it lacks it (one made by tlsroll
    0.1.0); returns what it issued again and why (``Reissued``), or None if it did not. Agents
    accept commands only from a certificate that names the leader. It is also issued again
    when it ends within ``own_renew_before`` (given ``warning``, ``expiry_warning_days``) of
    ``now`` (unless it ends with the CA, which no new one would outlive): agents check the
    leader's identity, not its certificate, so they accept the new one at once. Likewise one
    the CA did not sign or that is not valid yet at ``now`` (``pki.not_valid_yet``): agents
    would refuse it. Each of these is issued for a new key (``write_leader_pair``), as the
    viewer's always is: one issued for the same key left the one it replaced a certificate of
    that key, valid until its end, which a `tlsroll ca revoke` of the new one did not touch:
    a key that leaked went on commanding every agent with it (review of s63-o1 M1). And one
    that is not the certificate of ``key`` (``leader.key``'s unless given: the running
    leader's, ``OwnTls``) when the CA issues one for it (``pki.key_kind_problem``) and ``now``
    is not before the CA's own start (``reissue_problem``), for that key: a leader.pem
    restored from another backup than leader.key, or a leader.key replaced (or just written
    by ``write_leader_pair``), was a leader that could not start (session 52). And one with its
    names in the SAN (an earlier release's): a server certificate for the leader's address
    that the workstations would accept (``pki.NAMES_OID``); and one without its serial's name
    (``spiffe.leader_serial_host``: an earlier release's), which agents dial. Each is recorded
    with ``record`` before anything is written."""
    from cryptography import x509  # noqa: PLC0415 - see the imports

    from tlsroll import pki, spiffe  # noqa: PLC0415 - see the imports

    cert = pki.read_cert(layout.tls_cert)
    now = now or pki.utcnow()
    if key is None:
        key = pki.read_key(layout.tls_key)
    # One that ends with the CA is not due: a new one would end no later (it is cut to the
    # CA's end), so it would be issued again at every start and every check.
    near = cert.not_valid_after_utc - now < own_renew_before(warning)
    due = near and not pki.ends_with_ca(cert, ca.cert)
    # One the CA did not sign (a stale file, another CA's: its identity cannot tell, the
    # trust domain is the CA key's) or not valid yet (issued by a clock that ran ahead):
    # every agent refused it at the TLS handshake, and only their logs said why (s51).
    unusable = not pki.issued_by(cert, ca.cert) or pki.not_valid_yet(cert, ca.cert, now)
    td = ca.trust_domain
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    # (One of an earlier release, its names in the SAN, is issued again with them apart; one
    # without its serial's name, ``spiffe.leader_serial_host``, is issued again with it.)
    current = (
        spiffe.of(cert) == spiffe.leader(td)
        and spiffe.leader_host(td) in dns
        and spiffe.leader_serial_host(td, cert.serial_number) in dns
        and pki.names_apart(cert) is not None
    )
    if not pki.key_matches(cert, key):
        if reissue_problem(ca, key, now) is not None:
            # Nothing it can issue: the start refused such a pair (exit 2,
            # ``leader.runtime._check_own_tls``); the running leader goes on serving its own.
            return None
        issued = write_leader_cert(layout, ca, key, names, record)
        return Reissued(REISSUED_FOR_KEY, issued, key, cert)
    if unusable:
        reason = REISSUED_UNUSABLE
    elif due:
        reason = REISSUED_DUE
    elif not current or pki.names_of(cert) != names:
        reason = REISSUED_IDENTITY
    else:
        return None
    key = pki.generate_key()
    issued = write_leader_pair(layout, ca, key, names, record)
    return Reissued(reason, issued, key, cert)


def reissue_problem(
    ca: pki.CertificateAuthority, key: pki.PrivateKey, now: dt.datetime
) -> str | None:
    """Why the leader cannot issue its certificate for ``key`` at ``now``, with what to do,
    or None: a key of a kind the CA issues none for (``pki.key_kind_problem``), a clock before
    the CA's own start (no clock but a wrong one is: what it issued would end before its
    peers' now, as ``pki.not_valid_yet`` says), a CA that has ended."""
    from tlsroll import pki  # noqa: PLC0415 - see the imports

    if (kind := pki.key_kind_problem(key.public_key())) is not None:
        return (
            f"it is a key of {kind}, and the CA issues certificates for {pki.ISSUED_KEYS}"
            " only: restore the pair from a backup"
        )
    start, end = ca.cert.not_valid_before_utc, ca.cert.not_valid_after_utc
    if now < start:
        return (
            f"the clock ({now:%Y-%m-%d %H:%M} UTC) is before the CA's own start"
            f" ({start:%Y-%m-%d %H:%M} UTC), which no right clock is: set it right and start"
            " the leader again, or restore the pair from a backup"
        )
    if now >= end:
        return (
            f"the CA ended {end:%Y-%m-%d %H:%M} UTC and issues no more certificates: restore"
            " the pair from a backup"
        )
    return None


def check_secret_dirs(layout: Layout) -> None:
    """Refuse to start if a directory of the leader's secrets (``ca``, ``secrets``, ``tls``) is
    not ours alone (0700): whoever can enter or write it can read or swap a key."""
    for sub in ("ca", "secrets", "tls"):
        if (layout.data_dir / sub).exists():
            check_private_dir(layout.data_dir / sub)


def read_passphrase(path: Path, *, credential: bool = False) -> bytes:
    """The CA passphrase from ``path``: a secret file (``check_private_file``) or, with
    ``credential``, a systemd credential (``check_credential``). Read as every secret that must
    be a regular file is (``fsutil.read_regular``): a FIFO swapped in after the check is
    never opened to wait for a writer (the ops review of session 63: every secret file read
    without such a wait)."""
    if credential:
        check_credential(path)
    else:
        check_private_file(path)
    value = read_regular(path).strip()
    if not value:
        raise TerminalError(f"{path} is empty; it must hold the CA passphrase")
    return value


CREDENTIAL = "ca-passphrase"
"""The systemd credential that holds the CA passphrase on a real server: the unit loads it with
``LoadCredentialEncrypted=ca-passphrase:/etc/tlsroll/credstore.encrypted/ca-passphrase``, so
that it is kept encrypted (by the host's key or TPM, ``systemd-creds encrypt``) outside the
data directory and reaches only this service, in ``$CREDENTIALS_DIRECTORY``."""


def passphrase_source(configured: Path, environ: Mapping[str, str] = os.environ) -> Path:
    """Where the CA passphrase comes from: the systemd credential ``ca-passphrase`` when the
    service manager passed it (``$CREDENTIALS_DIRECTORY``), else ``configured``
    (``ca_passphrase_file``, the demo's way). One line says what to do if neither exists."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / CREDENTIAL).exists():
        return Path(directory) / CREDENTIAL
    if not Path(configured).exists():
        where = (
            f"{directory} has no {CREDENTIAL}"
            if directory
            else f"no systemd credential {CREDENTIAL} (LoadCredentialEncrypted=)"
        )
        raise TerminalError(
            f"no CA passphrase: {where}, and ca_passphrase_file {configured} does not exist"
        )
    return Path(configured)


def check_credential(path: Path) -> None:
    """Refuse a credential file others could read or anyone but root or us could change.

    Looser than ``check_private_file`` on purpose: systemd (PID 1) makes
    ``$CREDENTIALS_DIRECTORY`` for this service alone, and since v254 leaves the files owned
    by root with an ACL for the service's user, which shows as group bits in the mode (0440).
    What must still hold: no access for others, no write for group, owner root or us, in a
    directory with the same properties."""
    me = os.geteuid()
    for target, what in ((path.parent, "credential directory"), (path, "credential")):
        st = os.stat(target)
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid not in (me, 0):
            raise UnsafePermissions(f"{what} {target} is owned by {user_label(st.st_uid)}")
        if mode & 0o027:
            raise UnsafePermissions(
                f"{what} {target} is accessible by others (mode {mode:04o}); "
                "systemd's LoadCredentialEncrypted= never leaves it so"
            )


def upgrade_ca_key(layout: Layout, ca: pki.CertificateAuthority, passphrase: bytes) -> str | None:
    """Encrypt the CA key again if its key derivation is weak (an older tlsroll wrote PBKDF2
    with 2048 iterations): same key, same passphrase, scrypt (``tlsroll.keywrap``). Returns the
    old derivation's description if it did, else None. A key the tests' hook wrote
    (``keywrap.TEST_KDF_N_ENV``) is kept only while the hook is set (``Kdf.acceptable``)."""
    from tlsroll import keywrap, pki  # noqa: PLC0415 - see the imports

    kdf = keywrap.kdf_of(layout.ca_key.read_bytes())
    if kdf.acceptable():
        return None
    pki.write_key(layout.ca_key, ca.key, passphrase)
    return str(kdf)


def leader_names_problem(address: str, dns_names: tuple[str, ...]) -> str | None:
    """Why the leader's certificate cannot hold ``address`` and ``dns_names``, or None: each
    must name one host, by the rules the CA signs nodes' names by (``pki.ip_problem``,
    ``pki.dns_problem``; audit s34 M1). The leader binds its ports to ``address``, and agents
    dial it: 0.0.0.0 opened them on every interface, 127.0.0.1 is every host's own. Other
    loopback addresses (127.0.0.2 and up) stay allowed: tests and the demo run leaders there.
    DNS names are checked as the certificate holds them (``names.dns_given``: lowercase, one
    final dot dropped, as ``token create`` takes a node's), and there
    are at most as many as a node may hold (``names.MAX_DNS``)."""
    from tlsroll import names as pki_names  # noqa: PLC0415 - see the imports

    if problem := pki_names.ip_problem(address):
        return problem
    given = [pki_names.dns_given(name) for name in dns_names]
    if len(set(given)) > pki_names.MAX_DNS:
        return f"the leader holds at most {pki_names.MAX_DNS} DNS names, got {len(dns_names)}"
    for name in given:
        if problem := pki_names.dns_problem(name):
            return problem
    return None


# The shortest CA passphrase ``init`` takes from --ca-passphrase-file: the password policy's
# minimum for a password the admin chooses (``leader.password_policy.MIN_LENGTH``); a random
# one (none given) has 43. A leader started with an older, shorter one still starts.
MIN_CA_PASSPHRASE = 12


def init(
    data_dir: Path,
    address: str,
    *,
    dns_names: tuple[str, ...] = (),
    node_name: str | None = None,
    passphrase_file: Path | None = None,
) -> Layout:
    """Create a new cluster: CA, the leader's certificate, config. Refuses to overwrite."""
    from tlsroll import pki  # noqa: PLC0415 - see the imports
    from tlsroll.config import control_character, utf8  # noqa: PLC0415 - likewise

    layout = Layout(real_path(Path(data_dir)))
    if not utf8(str(layout.data_dir)):
        # leader.toml (UTF-8) names it: init would make the CA and fail writing the config,
        # and a re-run call it interrupted (review s49sec2 L4). Before anything is made.
        raise TerminalError(
            f"the data directory {shown_path(layout.data_dir)} is no UTF-8 text (a byte of "
            "another encoding in its path); choose one that is"
        )
    if (bad := control_character(str(layout.data_dir))) is not None:
        # leader.toml names it, and no text value of a config holds one (tlsroll.config):
        # the leader made here could never start.
        raise TerminalError(
            f"the data directory {shown_path(layout.data_dir)} holds a control character "
            f"({bad}); choose one without"
        )
    if node_name is not None and (problem := pki.node_name_problem(node_name)):
        raise TerminalError(problem)
    # (What an init running now leaves is told apart from what an interrupted one left only
    # under the lock.)
    _refuse_made(layout, interrupted=False)
    _refuse_foreign(layout)
    if problem := leader_names_problem(address, dns_names):
        raise TerminalError(problem)
    names = pki.Names.of(LEADER_NAME, [address], dns_names)
    # A given passphrase file is checked before anything is made: a refused one left the
    # empty directories behind (audit s34 L5).
    passphrase = None if passphrase_file is None else read_passphrase(passphrase_file)
    if passphrase is not None and (n := len(passphrase.decode(errors="replace"))) < (
        MIN_CA_PASSPHRASE
    ):
        raise TerminalError(
            f"the CA passphrase in {passphrase_file} has {n} characters; it encrypts the CA "
            f"key at rest and needs at least {MIN_CA_PASSPHRASE} (as a password the admin "
            "chooses); or leave out --ca-passphrase-file for a random one"
        )
    make_private_dir(layout.data_dir, 0o750)
    with _init_lock(layout):
        _refuse_made(layout)  # (again, under the lock: another init may have ended meanwhile)
        for sub in ("ca", "secrets", "tls"):
            make_private_dir(layout.data_dir / sub)
        make_private_dir(layout.data_dir / "run", 0o750)
        return _make(layout, names, node_name, passphrase_file, passphrase)


INIT_LOCK = "init.lock"


@contextlib.contextmanager
def _init_lock(layout: Layout) -> Iterator[None]:
    """One ``tlsroll init`` at a time on a data directory: two at once both succeeded, each
    printing the pin of its own CA, and one's ``ca.key`` was left encrypted with the other's
    passphrase, a leader that never starts (audit s39race M5). An exclusive ``flock`` on
    DATA/init.lock, held for the whole init; the kernel lets it go when the process ends, so a
    killed init leaves no stale lock (only the file, taken again by the next). The file is
    removed at the end; one that was removed or replaced between its opening and its lock
    is opened again (else two could hold locks on two different files)."""
    path = layout.data_dir / INIT_LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TerminalError(
                f"another tlsroll init is running on {layout.data_dir}; let it end"
            ) from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # (before the lock goes: the next init makes a new file)
        os.close(fd)


# What an init makes before its last write (the config): a directory holding nothing else was
# left by an init cut short (``_refuse_made`` sees to one that got as far as a CA key), and is
# set up again. lost+found: a file system's own, where the data directory is one.
INIT_ENTRIES = frozenset({"ca", "secrets", "tls", "run", INIT_LOCK, FIRST_START, "lost+found"})


def _refuse_foreign(layout: Layout) -> None:
    """Refuse an existing directory that holds anything but what an init makes: ``--data-dir
    "$DATA"`` with DATA unset set up the cluster in the current directory (and made it 0750),
    and so did any directory with other files in it (review s47rtin M4). A new or empty
    directory is what init sets up, as ``tlsroll-leader --backup DIR`` writes into."""
    try:
        entries = sorted(os.listdir(layout.data_dir))
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise TerminalError(f"{layout.data_dir} exists and is not a directory") from None
    other = [name for name in entries if name not in INIT_ENTRIES]
    if other:
        more = f" and {len(other) - 1} more" if len(other) > 1 else ""
        raise TerminalError(
            f"{layout.data_dir} is not empty and not a tlsroll data directory (it holds"
            f" {other[0]!r}{more}); init sets up a new or empty directory: name one"
        )


def init_made(layout: Layout) -> tuple[Path, ...]:
    """The files ``init`` makes before its config, in the order it makes them (after the CA
    passphrase, unless one was given: ``_make``)."""
    return (layout.ca_key, layout.ca_cert, layout.tls_key, layout.tls_cert)


def interrupted_init(layout: Layout) -> tuple[list[Path], list[Path]] | None:
    """What an init cut short left in ``layout``'s data dir, told apart from a file lost since
    (the leader says "restore it from a backup" of that) conservatively: no leader has run
    there (no store, nor its mark: ``leader.db.mark_store``), init wrote no config there,
    the directory holds nothing but what an init makes (``INIT_ENTRIES``: else init would
    refuse it), and of its files (``init_made``) those made are the first ones in init's
    order and at least one is missing. Returns (made, missing), or None. A leader whose
    config is elsewhere (the admin's own) reads such a data dir (review rev50f L1)."""
    ran = (layout.store, layout.store.with_name(layout.store.name + ".created"))
    try:
        if any(os.path.lexists(p) for p in (*ran, layout.config)):
            return None
        if any(name not in INIT_ENTRIES for name in os.listdir(layout.data_dir)):
            return None
        there = [os.path.lexists(p) for p in init_made(layout)]
    except OSError:  # (nothing can be told: the checks that follow say why)
        return None
    made = sum(1 for _ in itertools.takewhile(bool, there))
    if made == len(there) or any(there[made:]):
        return None
    files = init_made(layout)
    return list(files[:made]), list(files[made:])


def _refuse_made(layout: Layout, *, interrupted: bool = True) -> None:
    """Refuse a data directory a leader has run on, or (``interrupted``) an earlier init
    left a CA key in."""
    # A leader has run here if its store or the store's mark (``leader.db.mark_store``) exists.
    ran = (layout.store, layout.store.with_name(layout.store.name + ".created"))
    if layout.config.exists() or any(p.exists() for p in ran):
        raise TerminalError(f"{layout.data_dir} is already initialised; refusing to overwrite it")
    if interrupted and layout.ca_key.exists():
        # An init cut short before its last write (the config): no leader has run on what it
        # left, but a CA key is never overwritten; the admin removes it.
        left = [p for p in init_made(layout) if p.exists()]
        raise TerminalError(
            f"{layout.data_dir}: an earlier `tlsroll init` was interrupted before it wrote"
            f" {layout.config.name} (no leader has run here); remove what it left and run init"
            f" again: rm {' '.join(str(p) for p in left)}"
        )


def _make(
    layout: Layout,
    names: pki.Names,
    node_name: str | None,
    passphrase_file: Path | None,
    passphrase: bytes | None,
) -> Layout:
    """``init``'s work, under its lock: the passphrase (unless given), CA, leader
    certificate, the first start's mark (``Layout.first_start``), and last the config."""
    from tlsroll import pki  # noqa: PLC0415 - see the imports
    from tlsroll.config import dump_toml  # noqa: PLC0415 - see the imports

    if passphrase_file is None:
        passphrase_file = layout.default_passphrase_file
        import secrets  # noqa: PLC0415 - only here: every admin command imports this module

        write_atomic(passphrase_file, secrets.token_urlsafe(32).encode() + b"\n", PRIVATE)
    if passphrase is None:
        passphrase = read_passphrase(passphrase_file)

    ca = pki.CertificateAuthority.create()
    ca.save(layout.ca_cert, layout.ca_key, passphrase)
    key = pki.generate_key()
    pki.write_key(layout.tls_key, key)
    write_leader_cert(layout, ca, key, names)

    leader: dict[str, object] = {
        "address": names.ips[0],
        "dns_names": list(names.dns),
        "control_port": CONTROL_PORT,
        "join_port": JOIN_PORT,
        "viewer_port": VIEWER_PORT,  # the read-only web viewer; 0 turns it off
        "data_dir": layout.data_dir,
        "ca_passphrase_file": real_path(Path(passphrase_file)),
        "heartbeat_interval": 5,
        "node_name": node_name,  # None: left out (scope local then needs it set)
    }
    text = dump_toml({"leader": leader}, "tlsroll leader configuration (written by `tlsroll init`)")
    write_atomic(
        layout.first_start,
        f"tlsroll init made this cluster here; the leader's first start makes {layout.store.name}"
        " and removes this file. A leader finding neither (a restore that left the store out)"
        " refuses to start.\n".encode(),
        PRIVATE,
    )
    write_atomic(layout.config, text.encode())
    return layout
