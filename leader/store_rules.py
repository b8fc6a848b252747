"""Two of the store's rules that the admin CLI says too, apart from the store: which serial a
certificate of this CA can have, and the `tlsroll token create` (and join script) that lets a
node enrol again.

``tlsroll ca revoke``, ``workstations revoke`` and ``nodes remove`` check a serial or name the
token command before they call the leader; importing ``leader.store`` for that brought SQLite,
structlog (and rich through it), gRPC's helpers and the pure core into each of them, some
0.1 s of CPU (session 66). ``leader.store`` imports them from here, and the default of a
limit the leader's config sets (``WORKSTATION_CERTS_PER_HOUR``: ``leader.config`` reads it
here, not from the store, so a leader that refuses its config imports no gRPC: session 74).
"""

from __future__ import annotations

from collections.abc import Sequence

# A serial a revocation list can hold: positive, below 2**159 (RFC 5280 caps serials at 20
# octets; cryptography, which signs the list, at 159 bits, as its random serials are).
SERIAL_LIMIT = 2**159
# Workstation certificates a node's bootstrap service may ask for, per hour, unless leader.toml
# says otherwise (``workstation_certs_per_hour``): a brake on a stolen agent key, which could
# otherwise mint client certificates without end (each one is recorded, listed and revocable).
# On switch day every PC of the practice enrols again at its server within the morning: 30 cut
# off the 31st PC at one server for an hour (review s64 M3). 100 is a large practice's PCs at
# one server with room for the PCs that enrol twice (a wrong name, a second try), and still
# bounds a stolen key to 100 an hour.
WORKSTATION_CERTS_PER_HOUR = 100


def serial_fits(serial: str) -> bool:
    """Whether ``serial`` (hex) is one a certificate of this CA can have (``SERIAL_LIMIT``)."""
    try:
        return 0 < int(serial, 16) < SERIAL_LIMIT
    except ValueError:
        return False


def token_command(name: str, addresses: Sequence[str] = (), dns_names: Sequence[str] = ()) -> str:
    """The `tlsroll token create` that lets node ``name`` enrol again under its names."""
    words = [f"--address {a}" for a in addresses] + [f"--dns {d}" for d in dns_names]
    return " ".join([f"tlsroll token create --node {name}", *(words or ["--address IP"])])


def join_again(
    name: str, command: str, then: str, before: str = "", why: bool = True, short: bool = False
) -> str:
    """How node ``name`` enrols again the README's way ("On real servers", step 7): its join
    script, made by ``command`` (``token_command``; on the leader, where the admin reads this)
    and run on the node as root, writes the token where the agent reads it and keeps
    agent.toml's ``[server]`` table (said with ``why``; a bare token left the admin to find the
    join_token_file, and README teaches the script: review s71 walkthrough L8); then, on the
    node, ``before`` (a step, if any) and ``then`` (the agent's start). ``short``: the script
    and the node not named again (``join.sh``, "on the node"), where room is short."""
    script = "join.sh" if short else f"join-{name}.sh"
    return (
        f"`(umask 077; {command} --print-join-command > {script})`, `sh {script}` on "
        + ("the node" if short else name)
        + " as root"
        + (" (it keeps agent.toml's [server] table), " if why else ", ")
        + (f"`{before}` and " if before else "")
        + f"`{then}` there"
    )
