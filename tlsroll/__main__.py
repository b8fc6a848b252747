"""``python -m tlsroll``: the ``tlsroll`` command (see ``tlsroll.cli``)."""

from tlsroll.cli import main

raise SystemExit(main())
