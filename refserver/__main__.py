"""``python -m refserver``: run the reference server (``refserver.daemon``, as the node agent's
reference driver starts it at every restart; ``tlsroll-refserver`` is the same)."""

from refserver.daemon import main

main()
