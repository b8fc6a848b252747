"""The tests' scrypt hook, ``TLSROLL_TEST_KDF_N``: one knob for every scrypt tlsroll makes.

Set (tests only: the suite's conftest sets 256), it lowers scrypt's N of what is written
meanwhile, so that each ``tlsroll init``, leader start, ``password set``, bootstrap PAKE and
login check of the test suite does not spend 0.05-0.2 s of CPU in scrypt:

- the CA key (``tlsroll.keywrap``: N=2^14 otherwise; such a key is kept only while the hook is
  set, and encrypted again at full strength at the first leader start without it);
- the auth password's verifier (``tlsroll.password``: N=2^15 otherwise) that ``tlsroll password
  set`` makes, and the least N a verifier may have (2^14 otherwise) wherever one is read: the
  leader, the agents, the reference server, and a workstation's bootstrap hello. Without the
  hook a verifier made under it is refused everywhere, as any below 2^14 always was (set the
  password again); a workstation without it is never talked down below 2^14 by a node.

A light module (no ``cryptography``): the agent, which never holds ``cryptography``, reads it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from tlsroll.errors import ConfigError, TerminalError

TEST_KDF_N_ENV = "TLSROLL_TEST_KDF_N"
"""Tests only: the scrypt N of the keys and verifiers written while it is set (``hook_kdf_n``):
a power of 2 from 2 to ``BELOW`` / 2. Set wrong it is an error (``KdfHookError``), never as
unset: the leader and the agent refuse to start (exit 2), ``tlsroll init`` and ``tlsroll
password set`` to run. Empty is as unset."""

BELOW = 2**14
"""The hook's N stays below this: ``keywrap.SCRYPT_N``, ``password.MIN_N`` (both 2^14)."""


class KdfHookError(TerminalError):
    """``TEST_KDF_N_ENV`` holds something other than a power of 2 below ``BELOW`` (the message
    says so in one line)."""


def hook_kdf_n(environ: Mapping[str, str] = os.environ) -> int | None:
    """The scrypt N the test hook (``TEST_KDF_N_ENV``) sets, or None when it is unset (or
    empty); ``KdfHookError`` if it holds anything but a power of 2 from 2 to ``BELOW`` / 2."""
    raw = environ.get(TEST_KDF_N_ENV, "")
    if not raw:
        return None
    # Its digits alone: ``int`` takes " 256", "+256", "2_56" and other scripts' digits too
    # (review s75 revpwkdf: set wrong, never as set).
    n = int(raw, 10) if raw.isascii() and raw.isdigit() else 0
    if not 2 <= n < BELOW or n & (n - 1):
        raise KdfHookError(
            f"{TEST_KDF_N_ENV} (tests only) must be a power of 2 from 2 to {BELOW // 2}, "
            f"got {raw[:20]!r}; unset it"
        )
    return n


def hook_refused_for(
    data_dir: Path, n: int | None, installed: Path | None = None, whose: str = "leader's"
) -> str | None:
    """Why the tests' scrypt hook (set to ``n``; None: unset) is refused for a daemon's
    ``data_dir``: the installed unit's own (``installed``; the leader's,
    ``tlsroll.defaults.DEFAULT_DATA_DIR``, if None), where a production CA key or password
    verifier lives, is never written weaker, whatever the environment says (review of s74
    scryptknob: a hook left in a production unit would keep the key up to 8192 times cheaper to
    guess, and every backup made meanwhile). None: not refused."""
    if n is None:
        return None
    if installed is None:
        from tlsroll.defaults import DEFAULT_DATA_DIR  # noqa: PLC0415 - only with the hook set

        installed = DEFAULT_DATA_DIR
    from tlsroll.fsutil import real_path  # noqa: PLC0415 - likewise

    try:
        production = real_path(data_dir) == real_path(installed)
    except OSError:  # (a symbolic link loop on the way)
        production = data_dir.absolute() == installed
    if not production:
        return None
    return (
        f"{TEST_KDF_N_ENV} (tests only) is set for {installed}, the installed {whose} data "
        "directory, whose keys and password verifiers are never written weaker; unset it"
    )


def start_hook(
    data_dir: Path, installed: Path | None = None, whose: str = "leader's"
) -> int | None:
    """A daemon's start (the leader's, the agent's: ``installed`` and ``whose`` as
    ``hook_refused_for``): the hook's N, or None when it is unset; set wrong, or for the
    installed data dir, a ``ConfigError`` ("environment": the start is refused, exit 2), never
    as unset. The caller says it (its own ``*.test_hook`` line: what it weakens differs)."""
    try:
        n = hook_kdf_n()
    except KdfHookError as exc:
        raise ConfigError("environment", None, str(exc)) from None
    if (refused := hook_refused_for(data_dir, n, installed, whose)) is not None:
        raise ConfigError("environment", None, refused)
    return n
