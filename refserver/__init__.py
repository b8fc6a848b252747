"""The reference server: the stand-in for a practice's application server (the managed server
of the demo and the tests). It runs as a process of its own, ``tlsroll-refserver``; the node
agent drives it only through its config file, its pid file and its admin socket.

``server`` is the aiohttp application, ``config`` its TOML config, ``store`` its entries and
freeze flag.
"""
