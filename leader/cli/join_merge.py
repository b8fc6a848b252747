"""The join script's merge (``tlsroll token create --print-join-command``), run on the node.

The script writes the agent's config for the node the token names; a node that already has an
``agent.toml`` (install.sh's example, or a node joined again after ``tlsroll init``) keeps what
the join does not set: the ``[server]`` table (and any other table but ``[node]`` and
``[leader]``) and the ``[agent]`` settings other than ``data_dir`` (``port``,
``bootstrap_port`` …), review s46rt2 L3; and its ``data_dir`` too unless the join command named
one (``--agent-data-dir``: the script then runs the merge without ``--keep-data-dir``), review
s47rev2 L5: the agent started on an empty data dir, its journal left in the old one. The script
runs this file's text with the node's Python (``python - KEPT NEW [--keep-data-dir]``, stdlib
only: the node may have no tlsroll to import): ``KEPT`` is the copy of the old config, ``NEW``
the join's config, rewritten in place with what is kept and checked by reading it back; one
line on stdout says what was kept. Exit 1 (``NEW`` unchanged, one line on stderr) if the result
would not hold exactly that.

The kept tables are copied as text (the admin's comments stay); a file whose tables cannot be
told apart line by line (a quoted table name, a ``[`` at the start of a line in a multi-line
string) is written from its values instead, comments left in the kept copy.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

JOINED = ("node", "leader")
"""Tables the join writes whole: the old ones are replaced."""
JOINED_AGENT_KEYS = ("data_dir",)
"""The ``[agent]`` keys the join sets; the old table's other keys are kept."""
KEEP_DATA_DIR = "--keep-data-dir"
"""The merge's third argument when the join command named no data dir: the old one stays (an
absolute path only: the agent refuses a relative one, review s48rev4 L4)."""
UNIT_DATA_DIR = "/var/lib/tlsroll-agent"
"""The data dir the agent's unit lets it write (``StateDirectory=``; tlsroll.defaults'
AGENT_DATA_DIR: this file imports nothing of tlsroll); another needs a drop-in."""
VIA_LINK = "--via-link"
"""``--via-link LINK TARGET``: the agent.toml there is a symbolic link: one to a file that does
not read as TOML is refused (another file of the system's named by mistake was replaced,
review s48rev4 L2)."""

_HEADER = re.compile(r"\s*\[\[?\s*([A-Za-z0-9_-]+)\s*(?:[.\]])")
_BARE = re.compile(r"[A-Za-z0-9_-]+")

Blocks = list[tuple[str, list[str]]]


def blocks(text: str) -> Blocks:
    """``text``'s lines by top-level table: ("", lines before the first header), then (name,
    lines from its header on) for each header; a sub-table ``[server.x]`` is ``server``'s."""
    found: Blocks = [("", [])]
    for line in text.splitlines(keepends=True):
        header = _HEADER.match(line)
        if header and header[1] != found[-1][0]:
            found.append((header[1], []))
        found[-1][1].append(line)
    return found


def _key(name: str) -> str:
    return name if _BARE.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write {type(value).__name__}")


def _table(name: str, table: Mapping[str, object]) -> str:
    return f"\n[{_key(name)}]\n" + "".join(f"{_key(k)} = {_value(v)}\n" for k, v in table.items())


def joined_agent_keys(old_agent: Mapping[str, object], keep_data_dir: bool) -> tuple[str, ...]:
    """The ``[agent]`` keys the join's config sets over the old one's: ``data_dir`` not when
    the join command named none and the old config has one."""
    kept = old_agent.get("data_dir")
    if keep_data_dir and isinstance(kept, str) and kept.startswith("/"):
        return tuple(k for k in JOINED_AGENT_KEYS if k != "data_dir")
    return JOINED_AGENT_KEYS


def _setting(keys: Sequence[str]) -> re.Pattern[str]:
    """A line that sets one of ``keys`` (bare or quoted)."""
    return re.compile(rf"\s*\"?({'|'.join(map(re.escape, keys))})\"?\s*=")


def merged_text(
    old_text: str, new_text: str, keep_data_dir: bool = False
) -> tuple[str, dict[str, object]]:
    """``new_text`` with what ``old_text`` keeps; and the values the result must read as.
    ValueError if ``new_text`` has no ``[agent]`` table or a value cannot be written."""
    old, new = tomllib.loads(old_text), tomllib.loads(new_text)
    old_agent = old.get("agent", {})
    joined_keys = joined_agent_keys(old_agent, keep_data_dir)
    agent_kept = {k: v for k, v in old_agent.items() if k not in joined_keys}
    tables = [t for t in old if t not in (*JOINED, "agent") and isinstance(old[t], dict)]
    expect = dict(new) | {t: old[t] for t in tables}
    expect["agent"] = {k: v for k, v in new["agent"].items() if k not in agent_kept} | agent_kept

    old_blocks = dict(blocks(old_text)[1:])
    out = []
    for name, lines in blocks(new_text):
        if name == "agent" and "agent" in old_blocks:
            kept = _setting(list(agent_kept))  # the old table's setting, not the join's
            out.append("".join(ln for ln in lines if not (agent_kept and kept.match(ln))))
            joined = _setting(joined_keys)
            rest = [ln for ln in old_blocks["agent"][1:] if not (joined_keys and joined.match(ln))]
            out.append("".join(rest).rstrip() + "\n" if "".join(rest).strip() else "")
        else:
            out.append("".join(lines))
    for name in tables:
        out.append("\n" + "".join(old_blocks.get(name, [])).rstrip() + "\n")
    text = "".join(out)
    if _reads(text) == expect:
        return text, expect
    # Not told apart line by line: from the values (the comments stay in the kept copy).
    preamble = "".join(blocks(new_text)[0][1])
    text = preamble + "".join(_table(t, expect[t]) for t in expect).lstrip("\n")
    return text, expect


def _reads(text: str) -> object:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None


def what_was_kept(
    old_text: str, new_text: str, kept_copy: Path, keep_data_dir: bool = False
) -> str:
    """One line: what the new config keeps of the old one, and where the old one is."""
    old, new = tomllib.loads(old_text), tomllib.loads(new_text)
    kept = []
    for name, table in old.items():
        if name in (*JOINED, "agent") or not isinstance(table, dict):
            continue
        driver = table.get("driver")
        kept.append(f"[{name}]" + (f" (driver {driver})" if isinstance(driver, str) else ""))
    agent = old.get("agent", {})
    joined_keys = joined_agent_keys(agent, keep_data_dir)
    if keys := sorted(k for k in agent if k not in joined_keys):
        kept.append("[agent] " + ", ".join(keys))
    said = (
        f"kept {', '.join(kept)} of the agent.toml that was there"
        if kept
        else "the agent.toml that was there had no [server] and no other [agent] setting to keep"
    )
    was, now = agent.get("data_dir"), new.get("agent", {}).get("data_dir")
    if "data_dir" not in joined_keys and was != now:
        said += f"; [agent] data_dir stays {was} (the join command named none: --agent-data-dir)"
        if isinstance(was, str) and was.rstrip("/") != UNIT_DATA_DIR:
            said += (
                f"; the agent's unit lets it write {UNIT_DATA_DIR} only: add "
                f"ReadWritePaths={was} with `systemctl edit tlsroll-agent` if it has none"
            )
    elif was is not None and was != now and keep_data_dir:
        said += f"; [agent] data_dir is now {now} (it was {was}, not an absolute path)"
    elif was is not None and was != now:
        said += f"; [agent] data_dir is now {now} (it was {was}: --agent-data-dir)"
    return f"{said}; all of it is in {kept_copy}"


def main(argv: Sequence[str]) -> int:
    kept_copy, new_file = Path(argv[0]), Path(argv[1])
    keep_data_dir = KEEP_DATA_DIR in argv[2:]
    # ``--via-link LINK TARGET``: the agent.toml there is LINK, to TARGET.
    link = list(argv[argv.index(VIA_LINK) + 1 :][:2]) if VIA_LINK in argv[2:] else []
    new_text = new_file.read_text(encoding="utf-8")
    try:
        old_text = kept_copy.read_text(encoding="utf-8")
        tomllib.loads(old_text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        if len(link) == 2:
            print(
                f"join: {link[0]} is a symbolic link to {link[1]}, which does not read as TOML: "
                "not an agent config; point it at the agent's config or remove it; nothing "
                "changed",
                file=sys.stderr,
            )
            return 1
        print(
            f"join: the agent.toml that was there does not read as TOML ({exc}): nothing of it "
            f"kept; it is {kept_copy}",
        )
        return 0
    try:
        text, expect = merged_text(old_text, new_text, keep_data_dir)
    except ValueError as exc:
        text, expect = "", {"": str(exc)}
    if _reads(text) != expect:
        print(
            f"join: cannot keep the [server] table and [agent] settings of the agent.toml that "
            f"is there ({kept_copy}): nothing changed; move it away and run the script again, "
            "then add them by hand",
            file=sys.stderr,
        )
        return 1
    new_file.write_text(text, encoding="utf-8")
    print(f"join: {what_was_kept(old_text, new_text, kept_copy, keep_data_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
