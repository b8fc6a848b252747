"""Typed reading and writing of TOML config files; read errors name the file and the key.

cfg = ConfigFile.load(path)
node = cfg.section("node")
name = node.text("name")                 # ConfigError: "...agent.toml: [node].name: missing"
port = node.port("port", default=9442)   # ConfigError: "...: expected an integer, got string"
cfg.finish()                             # ConfigError: "...: [node].prot: unknown key (did
                                         #   you mean port?)" for any key or table never read

A file that holds a secret inline (a key named like one, e.g. ``join_token``, that does not
name a file) must be ours and readable by nobody else: ``load`` refuses it otherwise, naming the
key and the fix (``chmod 600``, or the key's ``…_file`` twin).

A key counts as known once the code has asked for it (with or without a default), so the
readers themselves are the list of keys; ``finish()`` refuses the rest, so that a misspelt key
is an error instead of a silent fallback to a default. ``dump_toml`` writes config files.
"""

from __future__ import annotations

import codecs
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any, TypeVar

import tomli_w

from tlsroll.echo import shown
from tlsroll.errors import ConfigError, raise_if_local
from tlsroll.fsutil import file_kind, owner_fix, real_path

T = TypeVar("T")
_MISSING: Any = object()

# A config file is a few KiB; what is larger is not one (and is not read whole).
MAX_CONFIG_BYTES = 1024 * 1024

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""A control character (C0, DEL, C1): what no text value of a config holds."""


def control_character(text: str) -> str | None:
    """The first control character of ``text`` (C0, DEL, C1), escaped (``\\n``), or None: what
    no text value of a config holds (``Section.text``), a path ``init`` writes into one
    included."""
    bad = _CONTROL.search(text)
    return None if bad is None else repr(bad.group(0))[1:-1]


def utf8(path: str) -> bool:
    """Whether ``path`` encodes to UTF-8 (a config file is UTF-8): a file name's byte that is
    not (a working directory made under another encoding) comes back from the OS as a lone
    surrogate."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}


def _kind(value: object) -> str:
    return {
        str: "string",
        int: "integer",
        bool: "boolean",
        float: "float",
        list: "list",
        dict: "table",
    }.get(type(value), type(value).__name__)


def _close_match(name: str, known: Iterable[str]) -> list[str]:
    """The known name closest to ``name``, if one is close (for a config error's hint). difflib
    is imported here, on an error's path: a daemon that reads a good config never loads it
    (~0.13 MiB of a daemon's memory for its life; issue 15)."""
    import difflib  # noqa: PLC0415 - only for an error's hint (see the docstring)

    return difflib.get_close_matches(name, list(known), n=1)


def _did_you_mean(name: str, known: Iterable[str], fmt: str = "{}") -> str:
    close = _close_match(name, known)
    return f" (did you mean {fmt.format(close[0])}?)" if close else ""


class Section:
    """One ``[table]`` of a config file; it remembers which keys were read (see ``finish``)."""

    def __init__(self, file: Path, name: str, data: Mapping[str, Any]) -> None:
        self.file = file
        self.name = name
        self.data = data
        self.read: set[str] = set()
        self._tables: list[Section] = []

    def key(self, key: str) -> str:
        return f"[{self.name}].{key}"

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(key), problem)

    def _get(self, key: str, typ: type[T], default: T) -> T:
        self.read.add(key)
        if key not in self.data:
            if default is _MISSING:
                raise self.error(key, "missing" + self._misspelt(key))
            return default
        value = self.data[key]
        # bool is an int subclass in Python; TOML keeps them apart, and so do we.
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise self.error(key, f"expected {_TYPE_NAMES[typ]}, got {_kind(value)}")
        return value

    def _misspelt(self, key: str) -> str:
        unread = [k for k in self.data if k not in self.read]
        close = _close_match(key, unread)
        return f" (is {close[0]} misspelt?)" if close else ""

    def has(self, key: str) -> bool:
        self.read.add(key)
        return key in self.data

    def table(self, key: str) -> Section:
        """The sub-table ``[name.key]`` (required); ``finish`` checks its keys too."""
        self.read.add(key)
        if key not in self.data:
            raise ConfigError(self.file, f"[{self.name}.{key}]", "missing table")
        value = self.data[key]
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {_kind(value)}")
        sub = Section(self.file, f"{self.name}.{key}", value)
        self._tables.append(sub)
        return sub

    def check_keys(self, known: Collection[str]) -> None:
        """ConfigError for the first key (in file order) not in ``known``."""
        for key, value in self.data.items():
            if key in known:
                continue
            hint = _did_you_mean(key, known)
            if isinstance(value, dict):
                raise ConfigError(self.file, f"[{self.name}.{key}]", "unknown table" + hint)
            raise self.error(key, "unknown key" + hint)

    def finish(self) -> None:
        """ConfigError for any key never read, here and in the sub-tables read with ``table``.

        Call it once every reader of the table is done with it."""
        self.check_keys(self.read)
        for sub in self._tables:
            sub.finish()

    def text(self, key: str, default: Any = _MISSING) -> Any:
        """A string: not empty, and without a control character (a NUL, a newline, an escape):
        no path, name, address or command word of a config holds one, and a NUL made every
        daemon end with a traceback (review s48rev3 M1). The value is not repeated."""
        value = self._get(key, str, default)
        if key in self.data:
            if not value:
                raise self.error(key, "must not be empty")
            self._no_control(key, value)
        return value

    def _no_control(self, key: str, value: str) -> None:
        bad = control_character(value)
        if bad is not None:
            raise self.error(key, f"holds a control character ({bad}); remove it")

    def integer(self, key: str, default: Any = _MISSING, *, lo: int = 0, hi: int = 2**31) -> Any:
        value = self._get(key, int, default)
        if key in self.data and not lo <= value <= hi:
            raise self.error(key, f"must be between {lo} and {hi}, got {value}")
        return value

    def port(self, key: str, default: Any = _MISSING) -> Any:
        return self.integer(key, default, lo=1, hi=65535)

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, bool, default)

    def str_list(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, list, default)
        if key not in self.data:
            return value
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{key}[{i}]", f"expected a string, got {_kind(item)}")
        return list(value)

    def ip(self, key: str, default: Any = _MISSING) -> Any:
        value = self.text(key, default)
        if key not in self.data:
            return value
        return self._check_ip(key, value)

    def ip_list(self, key: str, default: Any = _MISSING) -> Any:
        values = self.str_list(key, default)
        if key not in self.data:
            return values
        if not values:
            raise self.error(key, "needs at least one address")
        return [self._check_ip(f"{key}[{i}]", v) for i, v in enumerate(values)]

    def _check_ip(self, key: str, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise self.error(key, f"{shown(value)} is not an IP address") from None

    def path(self, key: str, default: Any = _MISSING) -> Any:
        """A path; relative paths are taken relative to the config file's directory."""
        value = self.text(key, default)
        if key not in self.data:
            return value
        p = Path(value).expanduser()
        if p.is_absolute():
            return p
        try:
            return real_path(self.file.parent / p)
        except OSError as exc:  # a symbolic link loop on the way
            raise self.error(key, f"{shown(value)}: {exc.strerror}") from None


def _utf8_text(path: Path, raw: bytes) -> str:
    """``raw`` as text, or a ConfigError that says what is wrong with it and where, and what to
    do: a file saved as "UTF-8 with BOM" was "Invalid statement (at line 1, column 1)", one in
    Latin-1 "'utf-8' codec can't decode byte 0xe9 in position 248" (session 67, bad-input
    sweep of the configs)."""
    if raw.startswith(codecs.BOM_UTF8):
        raise ConfigError(
            path,
            None,
            "starts with a byte order mark (saved as UTF-8 with BOM?): save it as UTF-8"
            " without one",
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            path,
            None,
            f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line} (another encoding,"
            " such as Latin-1?): save it as UTF-8",
        ) from None


class ConfigFile:
    def __init__(self, path: Path, data: Mapping[str, Any]) -> None:
        self.path = path
        self.data = data
        self.sections: dict[str, Section] = {}

    @classmethod
    def load(cls, path: Path) -> ConfigFile:
        path = Path(path)
        return cls.parse(path, cls.read(path))

    @staticmethod
    def read(path: Path) -> bytes:
        """The file's bytes (``load``'s first half; its errors). Only a regular file is read,
        and at most ``MAX_CONFIG_BYTES``: a FIFO hung the daemon (no writer) and /dev/zero
        filled its memory (review s47rtin L2). It is opened without blocking (a FIFO with no
        writer opens at once) and checked (``fstat``) before a byte is read."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except FileNotFoundError:
            raise ConfigError(path, None, "no such file") from None
        except OSError as exc:
            raise_if_local(exc, f"reading {path}")
            raise ConfigError(path, None, f"cannot read: {exc.strerror}") from None
        data = b""
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                with os.fdopen(fd, "rb", closefd=False) as f:
                    data = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise_if_local(exc, f"reading {path}")
            raise ConfigError(path, None, f"cannot read: {exc.strerror}") from None
        finally:
            os.close(fd)
        if not stat.S_ISREG(mode):
            raise ConfigError(path, None, f"not a regular file ({file_kind(mode)})")
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(
                path, None, f"larger than {MAX_CONFIG_BYTES} bytes; not a tlsroll config file"
            )
        return data

    @classmethod
    def parse(cls, path: Path, raw: bytes) -> ConfigFile:
        """The config ``raw`` (read from ``path``) says (``load``'s second half)."""
        try:
            data = tomllib.loads(_utf8_text(path, raw))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(path, None, f"not valid TOML: {exc}") from None
        except RecursionError:  # [[[[…]]]] thousands deep: tomllib's recursion (s47rtin L1)
            raise ConfigError(path, None, "not valid TOML: nested too deeply") from None
        if inline := inline_secrets(data):
            _check_holds_secrets(path, inline[0])
        return cls(path, data)

    def section(self, name: str, *, required: bool = True) -> Section:
        if name not in self.data:
            if required:
                unread = [t for t in self.data if t not in self.sections and t != name]
                close = _close_match(name, unread)
                hint = f" (is [{close[0]}] misspelt?)" if close else ""
                raise ConfigError(self.path, f"[{name}]", "missing table" + hint)
            section = Section(self.path, name, {})
        else:
            value = self.data[name]
            if not isinstance(value, dict):
                raise ConfigError(self.path, f"[{name}]", f"expected a table, got {_kind(value)}")
            section = Section(self.path, name, value)
        self.sections[name] = section
        return section

    def check_tables(self, known: Collection[str]) -> None:
        """ConfigError for the first top-level table or key (in file order) not in ``known``."""
        for name, value in self.data.items():
            if name in known:
                continue
            if not isinstance(value, dict):
                raise ConfigError(self.path, name, "unknown key outside any table")
            tables = ", ".join(f"[{t}]" for t in known)
            hint = _did_you_mean(name, known, "[{}]") or (f" (only {tables})" if known else "")
            raise ConfigError(self.path, f"[{name}]", "unknown table" + hint)

    def finish(self, *, pending: Collection[str] = ()) -> None:
        """ConfigError for any table never asked for and any key never read.

        ``pending`` names sections whose readers are not done yet (e.g. ``[server]``, read by
        the driver it names): whoever finishes reading one calls its ``Section.finish()``."""
        self.check_tables(self.sections)
        for name, section in self.sections.items():
            if name not in pending:
                section.finish()


# A key named like a secret holds one inline, unless it names a file (``join_token_file``).
_SECRET_KEY = re.compile(r"(secret|token|password|passphrase|private|verifier)", re.IGNORECASE)
# Where the secret of a key can live instead of inline.
_SECRET_FILE_KEYS = {"join_token": "join_token_file"}


def inline_secrets(data: Mapping[str, Any], table: str = "") -> list[str]:
    """The keys (``[table].key``) of ``data`` that hold a secret inline, in file order."""
    found = []
    for key, value in data.items():
        if isinstance(value, dict):
            found += inline_secrets(value, f"{table}.{key}" if table else key)
        elif (
            isinstance(value, str)
            and value
            and _SECRET_KEY.search(key)
            and not key.endswith(("_file", "_dir", "_path"))
        ):
            found.append(f"[{table}].{key}" if table else key)
    return found


def _check_holds_secrets(path: Path, key: str) -> None:
    """A config file with a secret inline is a secret file: ours, and 0600 (or stricter)."""
    st = os.stat(path)
    name = key.rpartition(".")[2]
    instead = (
        f", or put it in a file named by {_SECRET_FILE_KEYS[name]}"
        if (name in _SECRET_FILE_KEYS)
        else ""
    )
    if st.st_mode & 0o077:
        raise ConfigError(
            path,
            key,
            f"a secret inline in a file group or others can read (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}{instead}",
        )
    if st.st_uid != os.geteuid():
        raise ConfigError(
            path,
            key,
            f"a secret inline in a file owned by uid {st.st_uid}, not by uid {os.geteuid()} "
            f"who runs this; {owner_fix(st.st_uid, path)}{instead}",
        )


def _plain(value: object) -> object:
    if isinstance(value, PurePath):  # (a node's, in a join script, is a PurePosixPath)
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return _plain_table(value)
    return value


def _plain_table(table: Mapping[str, object]) -> dict[str, object]:
    return {str(k): _plain(v) for k, v in table.items() if v is not None}


def dump_toml(tables: Mapping[str, Mapping[str, object]], header: str = "") -> str:
    """TOML text for ``tables`` (written by tomli-w, so any string round-trips via tomllib).

    ``header`` becomes comment lines at the top; a ``None`` value leaves its key out; a path is
    written as its string; a table named ``"a.b"`` is the sub-table ``[a.b]``.
    """
    doc: dict[str, Any] = {}
    for name, table in tables.items():
        parent = doc
        *outer, last = name.split(".")
        for part in outer:
            parent = parent.setdefault(part, {})
        parent.setdefault(last, {}).update(_plain_table(table))
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return (comments + "\n" if comments else "") + tomli_w.dumps(doc)
