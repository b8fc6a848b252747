"""Typed reading of TOML config files, with errors that name the file and the key.

cfg = ConfigFile.load(path)
node = cfg.section("node")
name = node.str("name")                  # ConfigError: "...agent.toml: [node].name: missing"
port = node.int("port", default=9442)    # ConfigError: "...: expected an integer, got string"
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from tlsroll.errors import ConfigError

T = TypeVar("T")
_MISSING: Any = object()

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


class Section:
    """One ``[table]`` of a config file."""

    def __init__(self, file: Path, name: str, data: Mapping[str, Any]) -> None:
        self.file = file
        self.name = name
        self.data = data

    def key(self, key: str) -> str:
        return f"[{self.name}].{key}"

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(key), problem)

    def _get(self, key: str, typ: type[T], default: T) -> T:
        if key not in self.data:
            if default is _MISSING:
                raise self.error(key, "missing")
            return default
        value = self.data[key]
        # bool is an int subclass in Python; TOML keeps them apart, and so do we.
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise self.error(key, f"expected {_TYPE_NAMES[typ]}, got {_kind(value)}")
        return value

    def has(self, key: str) -> bool:
        return key in self.data

    def text(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, str, default)
        if key in self.data and not value:
            raise self.error(key, "must not be empty")
        return value

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
            raise self.error(key, f"{value!r} is not an IP address") from None

    def path(self, key: str, default: Any = _MISSING) -> Any:
        """A path; relative paths are taken relative to the config file's directory."""
        value = self.text(key, default)
        if key not in self.data:
            return value
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.file.parent / p).resolve()


class ConfigFile:
    def __init__(self, path: Path, data: Mapping[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def load(cls, path: Path) -> ConfigFile:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(path, None, "no such file") from None
        except OSError as exc:
            raise ConfigError(path, None, f"cannot read: {exc.strerror}") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(path, None, f"not valid TOML: {exc}") from None
        return cls(path, data)

    def section(self, name: str, *, required: bool = True) -> Section:
        if name not in self.data:
            if required:
                raise ConfigError(self.path, f"[{name}]", "missing table")
            return Section(self.path, name, {})
        value = self.data[name]
        if not isinstance(value, dict):
            raise ConfigError(self.path, f"[{name}]", f"expected a table, got {_kind(value)}")
        return Section(self.path, name, value)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        text = str(value)
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        if any(ord(c) < 0x20 for c in escaped):
            raise ValueError(f"control character in config value {text!r}")
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(tables: Mapping[str, Mapping[str, object]], header: str = "") -> str:
    """Write tables of scalars and lists (all tlsroll's configs need); round-trips via tomllib."""
    lines = [f"# {line}" for line in header.splitlines()]
    for name, table in tables.items():
        if lines:
            lines.append("")
        lines.append(f"[{name}]")
        for key, value in table.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
