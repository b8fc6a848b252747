"""``python -m refserver``: run the reference server (see ``refserver.server``), as the node
agent's reference driver starts it at every restart, inside the switch's freeze window.

``tlsroll.lean.keep_out()`` comes first, as in the agent: structlog would import rich and
pygments merely because they are installed, about 40 ms of every start of the server (and
4 MiB), which the freeze window waited for (issue 15)."""

from tlsroll import lean

lean.keep_out()

from refserver.server import run  # noqa: E402 - only after keep_out (see the docstring)

run()
