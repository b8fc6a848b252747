"""Who may read what a switch stages: the live config's sharing, and a staged file written so.

The files a switch names (the key, certificate and CA, the password's verifier file) are read
by the managed server after its restart, with the access the live config gives (``Sharing``).
``write_staged`` writes one of them so, in a directory no other user could swap. Used by the
agent (``nodeagent.plans``, which says how the live config is shared: ``plans.sharing``) and by
its crypto worker's child (``certwork_ops.new_key``: a rollout's new key), which imports only
what its ops need (``nodeagent.cryptoworker_child``): hence a module of its own, logging through
``tlsroll.leanlog``.
"""

from __future__ import annotations

import grp
import os
from dataclasses import dataclass
from pathlib import Path

from tlsroll import leanlog
from tlsroll.errors import UnsafePermissions
from tlsroll.fsutil import (
    PRIVATE,
    PUBLIC,
    config_dir_problem,
    config_link_problem,
    user_label,
    write_atomic,
)

log = leanlog.get_logger(__name__)

SECRET_FILES = frozenset({"server.key", "auth-verifier.json"})  # never more than the config


@dataclass(frozen=True)
class Sharing:
    """What the files a switch names (the key, certificate and CA, the verifier file) and the
    directories on the way (``tlsroll-tls``, the rollout's) are given: the access the live
    config gives, for the managed server reads both after its restart. A server running as a
    user of its own (systemd's ``User=praxis``) reads a config ``root:praxis 0640`` by its
    group, ``praxis:praxis 0600`` as its owner: the files get the config's group, 0640, and
    stay the agent's (``root:praxis 0640`` both ways; 0600 if the config is the agent's and
    its group may not read it: never the server's user's, who could
    rewrite the CA and the verifier file the root bootstrap service serves; nothing for
    others, whatever the config allows them); the directories stay the agent's, with the
    config's group, 0710 (the group passes through, never lists nor writes). ``own``: a
    config of the agent's user and group (root:root 0600, the common case), or a driver whose
    server runs as the agent (the reference driver): everything as before, the agent's, key
    0600, certificates 0644, directories 0700."""

    owner: tuple[int, int]  # the files' (uid, gid): the agent's uid, always
    mode: int  # the key's and the verifier file's: 0600, or 0640 with the config's group
    public_mode: int  # the certificate's and CA's: 0644 for the agent's own, else ``mode``
    group: int | None  # the directories' group (None: as made)
    dir_mode: int  # 0700, or 0710

    @classmethod
    def own(cls) -> Sharing:
        return cls((os.geteuid(), os.getegid()), PRIVATE, PUBLIC, None, 0o700)

    def file_mode(self, path: Path) -> int:
        return self.mode if path.name in SECRET_FILES else self.public_mode

    @property
    def reader(self) -> tuple[int, int] | None:
        """Whom the key is shared with (``check_private_file``'s ``shared``), None if no one."""
        return None if self.group is None else self.owner


def refuse_unsafe_dir(directory: Path) -> None:
    """``UnsafePermissions`` (the message ends with what to run) if ``directory`` (the live
    config's, or one the agent made under it) is one another user could swap
    (``config_dir_problem``): nothing is staged, shared or written there then."""
    problem = config_dir_problem(directory)
    if problem:
        raise UnsafePermissions(problem)


def refuse_linked_config(config_file: Path) -> None:
    """``UnsafePermissions`` (the message says which path to name instead) if the server's
    config ``config_file`` is a symbolic link (``config_link_problem``): the agent would
    replace the link by a file of its own."""
    problem = config_link_problem(config_file)
    if problem:
        raise UnsafePermissions(problem)


def write_staged(path: Path, data: bytes, share: Sharing) -> None:
    """A file of a stage directory written (``write_atomic``) with ``share``'s owner and mode;
    an owner that could not be set is said (the file stays the agent's alone). Refused in a
    directory another user could swap (``refuse_unsafe_dir``, from / down to the file's)."""
    refuse_unsafe_dir(path.parent)
    write_atomic(path, data, share.file_mode(path), share.owner)
    _said_unkept(path, share)
    _said_group_wide(path, share)


def _said_group_wide(path: Path, share: Sharing) -> None:
    """``stage.group_shares_secrets`` if a secret (the key, the verifier file: password-
    equivalent) is readable by a group that has members listed besides the server (/etc/group:
    ``root:adm 0640`` lets every admin read it): the config's group decides, as the config
    does; a group of the server's alone (``praxis``, no members listed) is said nothing."""
    if share.group is None or path.name not in SECRET_FILES or not share.mode & 0o040:
        return
    try:
        group = grp.getgrgid(share.group)
    except KeyError:
        return
    if group.gr_mem:
        log.warning(
            "stage.group_shares_secrets",
            file=str(path),
            group=group.gr_name,
            members=",".join(group.gr_mem),
            detail="the config's group reads the key and the password's verifier too; give the "
            "config a group of the server's alone",
        )


def _said_unkept(path: Path, share: Sharing) -> None:
    """``stage.owner_not_kept`` if ``path`` did not get ``share``'s owner (no CAP_CHOWN: the
    agent's unit of an earlier release), as ``Driver.stage_config`` says it of the config."""
    st = os.stat(path)
    if (st.st_uid, st.st_gid) != share.owner:
        log.warning(
            "stage.owner_not_kept",
            file=str(path),
            owner=f"{user_label(share.owner[0])}, gid {share.owner[1]}",
            written_as=f"{st.st_uid}:{st.st_gid}",
            detail="the agent may not chown (CAP_CHOWN): the file is its own, and the "
            "managed server's user may not read it",
        )
