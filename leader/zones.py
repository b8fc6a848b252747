"""Time zones: IANA names from the config and the command line, and the leader host's own.

``maintenance_timezone`` in leader.toml (``leader.config``) is read with ``load_zone``; a
maintenance window without it is the host's local time, and ``host_is_utc`` tells the leader
to warn when that is UTC (servers commonly run on UTC; a German practice's "04:00-06:00" is
then 06:00-08:00 in summer). ``tlsroll notify`` shows its times in the practice's zone
(``local_zone_name`` when neither ``--timezone`` nor ``maintenance_timezone`` names one).

``zoneinfo`` is imported by ``load_zone`` only: on import it reads Python's build settings
(``sysconfig``, for its TZPATH), about 0.75 MiB the leader kept for months though most
practices set no ``maintenance_timezone`` (issue 15).
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import zoneinfo

UTC_NAMES = {"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Etc/Universal", "Universal", "Zulu", "Etc/Zulu"}
UTC_NAMES |= {"GMT", "Etc/GMT", "Etc/GMT0", "Etc/GMT+0", "Etc/GMT-0", "GMT0", "Etc/Greenwich"}


# Files in the zone database that load but are no practice's zone (review s36 I1): the host's
# own zone under a name each machine reads as its own, the default rules of POSIX TZ strings,
# "Factory" (UTC, shown as "-00"); "posix/..." copies the zones, "right/..." counts leap
# seconds (27 s off the wall clock the practice and the host keep).
NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})
NOT_ZONE_DIRS = frozenset({"posix", "right"})


def load_zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA zone ``name`` ("Europe/Berlin"); ValueError with a one-line message if there is
    none of that name (a typo, a path, a directory such as "Europe", a POSIX TZ string) or it
    names no practice's zone (``NOT_ZONES``, ``NOT_ZONE_DIRS``)."""
    if name in NOT_ZONES or name.split("/", 1)[0] in NOT_ZONE_DIRS:
        raise ValueError(f"{name!r} is not an IANA time zone name; use one such as Europe/Berlin")
    import zoneinfo  # noqa: PLC0415 - only with a zone to load (see the docstring)

    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # OSError: "Europe", a dir
        raise ValueError(
            f"unknown time zone {name!r}; use an IANA name such as Europe/Berlin"
        ) from None


def local_zone_name() -> str | None:
    """The leader host's own zone as an IANA key (``TZ``, ``/etc/timezone``,
    ``/etc/localtime``), or None if it cannot be told."""
    tz = os.environ.get("TZ", "").removeprefix(":")
    if tz:
        return tz
    try:
        name = Path("/etc/timezone").read_text(encoding="utf-8").strip()
    except OSError:
        name = ""
    if name:
        return name
    try:
        target = os.readlink("/etc/localtime")
    except OSError:
        return None
    _, sep, key = target.partition("zoneinfo/")
    # posix/Europe/Berlin is a copy of Europe/Berlin, under a name load_zone refuses.
    return key.removeprefix("posix/") if sep else None


def host_is_utc(year: int | None = None) -> bool:
    """Whether the host's local time (its ``TZ``, as ``datetime.astimezone`` reads it) is UTC
    the whole year: no offset in January, none in July. Judged by the offsets, not the name,
    so ``TZ=GMT`` or no zone configured at all count, and Europe/London does not."""
    year = year or dt.date.today().year
    return all(
        dt.datetime(year, month, 1, 12).astimezone().utcoffset() == dt.timedelta(0)
        for month in (1, 7)
    )
