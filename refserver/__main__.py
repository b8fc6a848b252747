"""``python -m refserver``: run the reference server (see ``refserver.server``)."""

from refserver.server import main

raise SystemExit(main())
