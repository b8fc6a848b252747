"""``python -m refserver``: run the reference server (see ``refserver.server``)."""

from refserver.server import run

run()
