"""The read-only web viewer of the update schema: https on the leader (port 9444), live.

    grants       one-time login links and the browser sessions they open (leader.sqlite3)
    certificate  the viewer's serving certificate from the cluster CA
    snapshot     what it shows, read in one go from the leader's stores
    i18n         German (the default) and English
    pages        the HTML (Jinja2 templates in ``templates/``, ``static/`` beside them)
    metrics      /metrics in Prometheus' text format
    app          the aiohttp app: routes, the session check, 405 for anything but GET/HEAD
    server       the listener the daemon starts and stops

Importing this package imports none of its modules (the admin CLI needs only ``grants``).
"""
