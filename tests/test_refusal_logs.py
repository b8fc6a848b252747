"""Refusals anybody on the network can cause are logged sampled, per source (review s66 logs
M2): a node's bootstrap port (9443) logged ``bootstrap.start_refused`` for every bad or
throttled start, and the viewer ``viewer.login_refused`` for every unknown link (without the
source): 8477 requests in 5 s were 8477 lines, and journald's rate limit then dropped the
daemons' own lines. Now a source's first refusal is logged on its own, naming it, and the rest
in one summary a minute (``tlsroll.logsample``, the join port's rule). The services run for
real (the bootstrap service's https listener, the viewer's aiohttp app on a loopback address),
the requests come from two loopback sources; the clocks are injected, so the minute passes
without waiting."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from leader.schema_store import SchemaStore
from leader.store import Store
from leader.viewer import server as viewer_server
from leader.viewer.app import ViewerApp, handler_factory
from leader.viewer.grants import Grants
from leader.viewer.snapshot import Reader
from tests.conftest import IssuedCert, none_fresh
from tests.test_bootstrap import FakeClock, make_service, session_from
from tlsroll import bootstrap_protocol as proto
from tlsroll import pki
from tlsroll.logsample import SampledLog
from tlsroll.tls import client_context

FLOOD = 200


def named(events: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in events if e["event"] == name]


def test_a_source_s_first_refusal_is_logged_then_one_summary_a_minute() -> None:
    clock = FakeClock()
    sampled = SampledLog(clock=clock)
    assert sampled.first("192.0.2.7", "bad_request")
    assert not any(sampled.first("192.0.2.7", "rate_limited") for _ in range(FLOOD))
    assert sampled.first("192.0.2.8", "bad_request")  # another source: its own first line
    assert sampled.summary() is None  # not a minute yet
    clock.advance(59.9)
    assert sampled.summary() is None
    clock.advance(0.1)
    summary = sampled.summary()
    assert summary is not None and summary.fields() == {
        "seconds": 60,
        "refused_not_logged": FLOOD,
        "sources": 1,
        "top": [f"192.0.2.7: {FLOOD}"],
        "reasons": {"rate_limited": FLOOD},
    }
    assert sampled.summary() is None  # handed out once
    clock.advance(3600)  # an hour after its line, a source is told apart again
    assert sampled.first("192.0.2.7", "bad_request")


async def test_a_flood_of_bad_starts_on_the_bootstrap_port_writes_a_few_lines(
    issue_cert: Callable[..., IssuedCert],
    loopback: Callable[[], str],
    test_ca: pki.CertificateAuthority,
) -> None:
    address, first, second = loopback(), loopback(), loopback()
    clock = FakeClock()
    service = make_service(issue_cert(address, "node-a"), address, test_ca, clock=clock)
    context = client_context(test_ca.cert_pem)

    async def bad_starts(source: str, count: int) -> None:
        async with session_from(source) as s:
            for _ in range(count):
                async with s.post(
                    f"https://{address}:{service.bound_port}{proto.START_PATH}",
                    data=b"{}",
                    ssl=context,
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    assert resp.status == 400
                    await resp.read()

    async with service:
        with structlog.testing.capture_logs() as events:
            await bad_starts(first, FLOOD)
            await bad_starts(second, 3)
            refused = named(events, "bootstrap.start_refused")
            assert [e["remote"] for e in refused] == [first, second], refused
            assert named(events, "bootstrap.starts_refused_summary") == []
            clock.advance(60)
            await bad_starts(first, 1)
        summaries = named(events, "bootstrap.starts_refused_summary")
    assert len(events) == 3, [e["event"] for e in events]
    assert len(summaries) == 1 and summaries[0]["refused_not_logged"] == FLOOD + 2
    assert summaries[0]["top"] == [f"{first}: {FLOOD}", f"{second}: 2"]
    assert summaries[0]["sources"] == 2 and summaries[0]["reasons"] == {"bad_request": FLOOD + 2}


def test_a_flood_of_unknown_viewer_links_writes_a_few_lines(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    store = Store(tmp_path / "leader.sqlite3")
    address, first, second = loopback(), loopback(), loopback()
    clock = FakeClock()

    async def run() -> list[MutableMapping[str, Any]]:
        at = dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC)
        reader = Reader(
            store, SchemaStore(store.db), lambda: at, lambda _: True, [], fresh=none_fresh
        )
        app = ViewerApp(
            reader=reader,
            grants=Grants(store.db),
            clock=lambda: at,
            address=address,
            scrape_token=None,
            closing=asyncio.Event(),
            refusals_clock=clock,
        )
        server = TestServer(app.make(), host=address, port=0)
        await server.start_server()

        async def unknown_links(source: str, count: int) -> None:
            connector = aiohttp.TCPConnector(local_addr=(source, 0))
            async with aiohttp.ClientSession(connector=connector) as s:
                for _ in range(count):
                    url = f"http://{address}:{server.port}/login/{secrets.token_urlsafe(32)}"
                    async with s.get(url, allow_redirects=False) as resp:
                        assert resp.status == 401
                        await resp.read()

        try:
            with structlog.testing.capture_logs() as events:
                await unknown_links(first, FLOOD)
                await unknown_links(second, 3)
                assert [e["remote"] for e in named(events, "viewer.login_refused")] == [
                    first,
                    second,
                ]
                assert named(events, "viewer.logins_refused_summary") == []
                clock.advance(60)
                await unknown_links(first, 1)
        finally:
            app.close()
            await server.close()
        return events

    events = asyncio.run(run())
    refused = named(events, "viewer.login_refused")
    summaries = named(events, "viewer.logins_refused_summary")
    assert len(refused) == 2 and len(summaries) == 1, [e["event"] for e in events]
    assert summaries[0]["refused_not_logged"] == FLOOD + 2
    assert summaries[0]["top"] == [f"{first}: {FLOOD}", f"{second}: 2"]
    assert summaries[0]["reasons"] == {"unknown": FLOOD + 2}


async def _viewer_served(
    store: Store,
    address: str,
    server_log: viewer_server._HttpLog,
    scrape_token: str | None,
    refusals_clock: Callable[[], float] | None = None,
) -> tuple[ViewerApp, web.AppRunner, asyncio.Server]:
    """The viewer's app served as the leader serves it (its runner's settings, its request
    handler, ``server_log``), over plain TCP on ``address``: what is logged is the same."""
    at = dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC)
    reader = Reader(store, SchemaStore(store.db), lambda: at, lambda _: True, [], fresh=none_fresh)
    app = ViewerApp(
        reader=reader,
        grants=Grants(store.db),
        clock=lambda: at,
        address=address,
        scrape_token=scrape_token,
        closing=asyncio.Event(),
        **({} if refusals_clock is None else {"refusals_clock": refusals_clock}),
    )
    runner = web.AppRunner(
        app.make(), access_log=None, logger=server_log, keepalive_timeout=viewer_server.HEAD_SECONDS
    )
    await runner.setup()
    assert runner.server is not None
    served = await asyncio.get_running_loop().create_server(
        handler_factory(runner.server), address, 0
    )
    return app, runner, served


async def _answer(address: str, port: int, source: str, request: bytes) -> bytes:
    """One raw request on a connection of its own from ``source``: the answer's status line."""
    reader, writer = await asyncio.open_connection(address, port, local_addr=(source, 0))
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    return answer.split(b"\r\n", 1)[0]


def test_a_scrape_token_that_is_no_utf8_is_refused_not_a_server_error(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review s67 M2: ``Authorization: Bearer`` with bytes that are not UTF-8 (aiohttp keeps
    them as surrogates) raised ``UnicodeEncodeError`` in the token's check, before any
    session: a 500 and a ``viewer.request_failed`` error line for every such request, from
    anybody. A wrong token now: 401, and one line for the source, sampled (review s69 revlogs
    M3: ``viewer.scrape_refused``), that holds nothing of the token."""
    store = Store(tmp_path / "leader.sqlite3")
    address = loopback()

    async def run() -> tuple[list[bytes], list[MutableMapping[str, Any]]]:
        app, runner, served = await _viewer_served(
            store, address, viewer_server._HttpLog(), "a-scrape-token-of-32-characters!"
        )
        port = served.sockets[0].getsockname()[1]
        try:
            with structlog.testing.capture_logs() as events:
                statuses = [
                    await _answer(
                        address,
                        port,
                        address,
                        b"GET /metrics HTTP/1.1\r\nHost: viewer\r\nConnection: close\r\n"
                        b"Authorization: Bearer " + token + b"\r\n\r\n",
                    )
                    for token in (b"\xff\xfe", b"a-scrape-token-of-32-characters\xff")
                ]
        finally:
            app.close()
            served.close()
            await runner.cleanup()
        return statuses, events

    statuses, events = asyncio.run(run())
    assert [s.split(b" ")[1] for s in statuses] == [b"401", b"401"], statuses
    assert [(e["event"], e["reason"]) for e in events] == [
        ("viewer.scrape_refused", "wrong_token")
    ], events
    assert "scrape-token" not in str(events), events


def test_a_scrape_refused_says_why_in_its_answer_and_once_per_source_in_the_log(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Review s69 revlogs M3: a Prometheus server whose bearer token was not the one in
    ``metrics_token_file`` (or a leader with none) got the viewer's HTML page about login
    links, and the leader logged nothing: the admin who saw "401" on the scrape target found
    no line saying why. Now the answer says it in one line of text, and the leader logs a
    source's first refusal (the reason and what to do, never the token), then counts the
    others into a summary a minute (``tlsroll.logsample``: anybody may send these)."""
    store = Store(tmp_path / "leader.sqlite3")
    address, scraper = loopback(), loopback()
    clock = FakeClock()
    wrong = b"GET /metrics HTTP/1.1\r\nHost: v\r\nConnection: close\r\n"
    wrong += b"Authorization: Bearer not-the-token-0123456789abcdef\r\n\r\n"

    async def answer(port: int) -> bytes:
        reader, writer = await asyncio.open_connection(address, port, local_addr=(scraper, 0))
        try:
            writer.write(wrong)
            async with asyncio.timeout(10):
                return await reader.read()
        finally:
            writer.close()

    async def run(token: str | None) -> tuple[list[bytes], list[MutableMapping[str, Any]]]:
        app, runner, served = await _viewer_served(
            store, address, viewer_server._HttpLog(), token, clock
        )
        port = served.sockets[0].getsockname()[1]
        try:
            with structlog.testing.capture_logs() as events:
                answers = [await answer(port) for _ in range(5)]
                clock.advance(60)
                answers.append(await answer(port))
        finally:
            app.close()
            served.close()
            await runner.cleanup()
        return answers, events

    answers, events = asyncio.run(run("the-scrape-token-of-32-characters"))
    assert all(a.startswith(b"HTTP/1.1 401 ") for a in answers), answers[0][:200]
    assert all(b'WWW-Authenticate: Bearer realm="tlsroll"' in a for a in answers)
    body = answers[0].split(b"\r\n\r\n", 1)[1].decode()
    assert body == (
        "401: /metrics: the bearer token is not taken: a scrape sends `Authorization: Bearer`"
        " with the token in [leader].metrics_token_file (read when the leader starts; without"
        " that setting the leader takes no token); the leader's log (viewer.scrape_refused)"
        " says which\n"
    ), body
    with_file = _but_date(answers[0])
    [line] = named(events, "viewer.scrape_refused")
    assert (line["remote"], line["reason"]) == (scraper, "wrong_token"), line
    assert "metrics_token_file" in line["hint"], line
    [summary] = named(events, "viewer.scrapes_refused_summary")
    assert summary["refused_not_logged"] == 5 and summary["top"] == [f"{scraper}: 5"]
    assert "not-the-token" not in str(events), events

    # A leader without a metrics_token_file takes no token: the same answer, byte for byte
    # but its date (a caller learnt from it whether the leader has the file: session 70); its
    # log line says what to set.
    answers, events = asyncio.run(run(None))
    assert _but_date(answers[0]) == with_file, (answers[0], with_file)
    [line] = named(events, "viewer.scrape_refused")
    assert line["reason"] == "no_token_file" and "set one in leader.toml" in line["hint"], line


def _but_date(answer: bytes) -> bytes:
    """A raw HTTP answer without its ``Date`` header."""
    return b"\r\n".join(h for h in answer.split(b"\r\n") if not h.startswith(b"Date: "))
