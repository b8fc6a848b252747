"""http.client's own judgement of a server's answer: the oracle ``tlsroll.probe`` is held to.

The agent's verify and the leader's confirm judge a server with ``tlsroll.probe`` (asyncio
streams, the answer's head parsed by http.client's parser). The table tests in
tests/test_httpcheck.py run quirky and broken answers through both this blocking http.client
check and the probe: a server that one passes and the other fails would be rolled back by
one side and passed by the other. Not product code: no daemon judges a server this way.
"""

from __future__ import annotations

from tlsroll import httpcheck


def check_https(
    address: str, port: int, path: str, ca_pem: bytes, fingerprint: str | None
) -> str | None:
    """None if https on ``address:port`` serves ``path`` with 200 (and exactly the expected
    certificate, if given), else what is wrong."""
    url = f"https://{address}:{port}{path}"
    try:
        view = httpcheck.fetch_https(address, port, path, ca_pem)
    except httpcheck.PROBE_ERRORS as exc:
        return httpcheck.reason(url, exc)
    if fingerprint and view.fingerprint != fingerprint:
        return (
            f"https://{address}:{port} presents {view.fingerprint}, "
            f"not the staged certificate {fingerprint}"
        )
    return None if view.status == 200 else f"{url} answered {view.status}"


def check_http(address: str, port: int, path: str) -> str | None:
    """None if plain http on ``address:port`` serves ``path`` with 200, else what is wrong."""
    url = f"http://{address}:{port}{path}"
    try:
        status = httpcheck.fetch_http(address, port, path)
    except httpcheck.PROBE_ERRORS as exc:
        return httpcheck.reason(url, exc)
    return None if status == 200 else f"{url} answered {status}"
