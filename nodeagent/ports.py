"""Looking at the node from the agent: who holds a port, and could we bind it.

All blocking; call through ``asyncio.to_thread`` from async code. Probes only read: they never
change the node. Checks from outside (https, app path, open ports) are in ``tlsroll.httpcheck``.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from pathlib import Path

from tlsroll import peertext


def _proc_addr(hexaddr: str) -> tuple[str, int]:
    host, port = hexaddr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1])), int(port, 16)
    # /proc/net/tcp6: four little-endian 32-bit words
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    v6 = ipaddress.IPv6Address(words)
    # An IPv6 socket bound to ::ffff:a.b.c.d holds a.b.c.d: said as that, as it is asked
    # (``holder`` said "another process" of it: session 69, smalls).
    return str(v6.ipv4_mapped or v6), int(port, 16)


def listeners(port: int) -> dict[str, set[int]]:
    """Listening sockets on ``port``: local address → socket inodes (from /proc/net/tcp*).

    The tables list every TCP socket of the machine (a busy server has thousands): a line is
    matched on its port and state as text first, and only a match has its address decoded
    (decoding every line took 19 ms at 2,200 sockets, in every preflight)."""
    suffix = f":{port:04X}"
    found: dict[str, set[int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            if suffix not in line:
                continue
            cols = line.split()
            if len(cols) < 10 or cols[3] != "0A" or not cols[1].endswith(suffix):  # 0A = LISTEN
                continue
            address, p = _proc_addr(cols[1])
            if p == port:
                found.setdefault(address, set()).add(int(cols[9]))
    return found


def _socket_inodes(pid: str) -> set[str] | None:
    """The ``socket:[inode]`` links among the open fds of process ``pid``; None if the process
    is gone or its fds are not ours to read.

    The fds change while they are read: one that is closed between the listing and its
    ``readlink`` is skipped, never the whole process. The listing's own directory fd is always
    such a one when the process is this one (it is closed again before the names are read).
    """
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return None
    links = set()
    for name in names:
        try:
            link = os.readlink(f"{fd_dir}/{name}")
        except OSError:  # closed meanwhile (ENOENT) or not ours to read
            continue
        if link.startswith("socket:["):
            links.add(link)
    return links


def _describe(pid: str) -> str:
    """ "name (pid N, /path/to/executable)": enough for the node's admin to find the process
    (``ps -p N``). Never its command line: another program's arguments may hold its secrets
    (``--requirepass …``, ``-Dkeystore.password=…``), and this text goes into the leader's plan,
    the update schema, the read-only viewer and the logs (review s64 seed L2)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:  # it exited after we saw the socket: name it by its pid alone
        return f"a process that has just exited (pid {pid})"
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:  # not ours to read (the agent not root), or a kernel thread
        exe = ""
    # Another user's words, in a reason that goes into one-line errors and the leader's plan
    # (a newline or an escape sequence in a name split or coloured them: s44cli).
    where = f", {peertext.clean(exe, 120)}" if exe else ""
    return f"{peertext.clean(comm, 32)} (pid {pid}{where})"


def names_pid(description: str, pid: int) -> bool:
    """Whether ``description`` (of ``holder``) names process ``pid``."""
    return f"(pid {pid})" in description or f"(pid {pid}," in description


def holder(address: str, port: int) -> str | None:
    """Who listens on ``address:port`` (or on the wildcard): "name (pid N, executable)", or None.

    This process is looked at first, so that the agent's own listener (the bootstrap service
    on 9443) is named as the agent whatever else shares the socket. Needs to read other
    processes' fds to name them (the agent runs as root or as the server's user); otherwise it
    says "another process".
    """
    wildcard = {"0.0.0.0", "::"}  # noqa: S104 - compared, not bound
    inodes = set()
    for local, nodes in listeners(port).items():
        if local == address or local in wildcard:
            inodes |= nodes
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    me = str(os.getpid())
    try:
        others = sorted((p for p in os.listdir("/proc") if p.isdigit() and p != me), key=int)
    except OSError:
        others = []
    for pid in (me, *others):
        links = _socket_inodes(pid)
        if links and links & targets:
            return _describe(pid)
    return "another process"


def port_free(address: str, port: int) -> bool:
    """True if nothing could stop us binding ``address:port`` (probed by binding, then closing)."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def port_problem(address: str, port: int, what: str, own: set[int]) -> str | None:
    """Why the server or the agent could not listen on ``address:port`` (``what``: "https",
    "bootstrap"), or None: free, or held by one of the processes ``own``. An address this
    machine does not have (EADDRNOTAVAIL: a typo in the server's config, an address moved to
    another machine) is said as such: before, the OSError ended the preflight as an internal
    error with no reason (review s69 revref M)."""
    try:
        if port_free(address, port):
            return None
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        if exc.errno == errno.EADDRNOTAVAIL:
            why = "the address is not one of this machine's"
        return f"port {port} ({what}) on {address} cannot be listened on: {why}"
    who = holder(address, port) or "another process"
    if any(names_pid(who, pid) for pid in own):
        return None
    return f"port {port} ({what}) on {address} is taken by {who}"
