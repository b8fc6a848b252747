"""The web viewer shows who is still on http and every enrolled node (review s63 M1, M3), live,
against real processes: a leader, agents and reference servers on their own loopback
addresses, a transitional rollout left awaiting its finalize, a workstation that writes to
node1 from an address of its own and names itself in the ``X-Tlsroll-Workstation`` header,
and Debian's Chromium driven by Playwright (as ``tests/test_viewer.py``).

- The page had no word of who is still on http (SPEC: the viewer shows "who is still on
  http"; `schema show` did): a section lists each workstation (node, address, workstation,
  last seen), each node's row counts them, and ``/metrics`` has a gauge per node. It goes
  from the page by a patch of its own once the workstation is seen on https only.
- The page drew only the selected rollout's nodes: a node enrolled after it was nowhere
  (SPEC: "every node's state"). An "other nodes" table lists it, with what its server
  serves by its heartbeat.
- A used login link opened again in the browser its use signed in goes to the schema; any
  other browser still gets the 401 page (review s63 L3).
"""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import Cluster, wait_until
from tests.conftest import next_loopback
from tests.nodeside import Node
from tests.test_client_reports import one_node, phase_1
from tests.test_transitional import on_http_named
from tests.test_viewer import (
    BROWSER_TIMEOUT_MS,
    CHROMIUM,
    CHROMIUM_ARGS,
    base,
    fetch,
    link_for,
    path_of,
    session_for,
    spki_hash,
)
from tlsroll import httpcheck, tls
from tlsroll.clients import WORKSTATION_HEADER

pytestmark = pytest.mark.slow

# How long a workstation's sighting may take to reach the page: the agent's next report (its
# view of its server's clients is at most ``clients_refresh`` old, 1 s here), stored within a
# batch, and the page's next look.
REPORTED = 60_000  # ms


@contextmanager
def chromium(cluster: Cluster) -> Iterator[Browser]:
    """Debian's Chromium, headless, trusting the viewer's key (as ``test_viewer.browser``)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make` installs Debian's chromium package")
    args = [*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki_hash(cluster)}"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def write(node: Node, source: str, scheme: str, ca_pem: bytes, workstation: str) -> None:
    """One write to ``node``'s server from ``source``, named ``workstation`` by its header."""
    conn: http.client.HTTPConnection
    if scheme == "https":
        conn = httpcheck.HTTPSConnection(
            node.address,
            8443,
            timeout=10,
            context=tls.client_context(ca_pem),
            source_address=(source, 0),
        )
    else:
        conn = http.client.HTTPConnection(
            node.address, 8080, timeout=10, source_address=(source, 0)
        )
    try:
        conn.request(
            "POST",
            f"{node.server.app_path}entries",
            body=json.dumps({"marker": uuid.uuid4().hex, "ws": workstation}).encode(),
            headers={
                "Content-Type": "application/json",
                "Connection": "close",
                WORKSTATION_HEADER: workstation,
            },
        )
        response = conn.getresponse()
        response.read()
        assert response.status == 201, (scheme, response.status)
    finally:
        conn.close()


def on_http_gauge(cluster: Cluster, session: str) -> dict[str, float]:
    """``tlsroll_still_on_http`` by node; no scrape has a ``_created`` sample (review s63 L2:
    a histogram's changed at every scrape)."""
    scraped = fetch(cluster, "/metrics", cookie=session)
    assert scraped.status == 200, scraped
    families = list(text_string_to_metric_families(scraped.body))
    created = [s.name for f in families for s in f.samples if s.name.endswith("_created")]
    assert created == [], created
    return {
        s.labels["node"]: s.value
        for f in families
        if f.name == "tlsroll_still_on_http"
        for s in f.samples
    }


@pytest.mark.timeout(420)
def test_the_page_shows_who_is_still_on_http_and_every_enrolled_node_live(
    tmp_path: Path,
) -> None:
    with one_node(tmp_path, clients_refresh=1) as (cluster, node1):
        phase1 = phase_1(cluster, tmp_path)  # node1 serves http and https, awaiting finalize
        session = session_for(cluster, "metrics")
        assert on_http_gauge(cluster, session) == {"node1": 0.0}
        node2: Node | None = None
        try:
            with chromium(cluster) as browser:
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                context.set_default_timeout(BROWSER_TIMEOUT_MS)
                link = link_for(cluster, "Praxis-IT")
                page = context.new_page()
                page.goto(link + "?lang=en")
                page.get_by_role("link", name="Sign in").click()
                page.wait_for_url(base(cluster) + "/")
                page.wait_for_selector("#live.on")
                assert page.locator("html").get_attribute("lang") == "en"
                assert page.locator("#still-on-http h2").inner_text() == "Still on http"
                assert "no workstation uses http" in page.locator("#still-on-http").inner_text()
                assert page.locator("#other-nodes h2").inner_text() == "Other nodes"
                assert page.locator("#other-nodes").get_attribute("data-count") == "0"
                # a patch replaces parts of the page; a whole update replaces the rollout's
                # section too
                page.evaluate(
                    "() => { window.__marker = 'no reload';"
                    " window.__rollout = document.getElementById('rollout'); }"
                )

                # A workstation writes to node1 over http: listed, counted on node1's row.
                source = next_loopback()
                for _ in range(3):
                    write(node1, source, "http", cluster.ca_pem, "ws-x")
                listed = page.locator(
                    '#still-on-http tr[data-node="node1"][data-workstation="ws-x"]'
                )
                listed.wait_for(timeout=REPORTED)
                cells = listed.locator("td").all_inner_texts()
                assert cells[:2] == [source, "ws-x"] and cells[2] not in ("", "–"), cells
                wait_until(lambda: on_http_named(cluster, "node1") == [source], 30, "cli")
                counted = page.locator('#nodes tr[data-node="node1"] .on-http')
                assert counted.inner_text() == "1 still on http"
                assert on_http_gauge(cluster, session) == {"node1": 1.0}
                page.get_by_role("link", name="Deutsch").click()
                page.wait_for_selector('html[lang="de"]')
                page.wait_for_selector("#live.on")
                assert page.locator("#still-on-http h2").inner_text() == "Noch auf http"
                assert (
                    page.locator('#nodes tr[data-node="node1"] .on-http').inner_text()
                    == "1 noch auf http"
                )
                page.get_by_role("link", name="English").click()
                page.wait_for_selector('html[lang="en"]')
                page.wait_for_selector("#live.on")
                page.evaluate(
                    "() => { window.__marker = 'no reload';"
                    " window.__rollout = document.getElementById('rollout'); }"
                )

                # The same workstation on https only from now on: it goes, by patches.
                for _ in range(2):
                    write(node1, source, "https", cluster.ca_pem, "ws-x")
                page.locator('#still-on-http tr[data-workstation="ws-x"]').wait_for(
                    state="detached", timeout=REPORTED
                )
                assert page.locator("#still-on-http").get_attribute("data-count") == "0"
                page.locator('#nodes tr[data-node="node1"] .on-http').wait_for(state="detached")
                assert page.evaluate("window.__marker") == "no reload"
                same = "document.getElementById('rollout') === window.__rollout"
                assert page.evaluate(same), "the page was replaced whole, not patched"
                wait_until(lambda: on_http_gauge(cluster, session) == {"node1": 0.0}, 30, "0")

                # A node enrolled after the rollout: on the page, with its server's scheme.
                node2 = Node(cluster, "node2", next_loopback(), tmp_path / "n2")
                node2.start()
                cluster.wait_for_nodes_online(["node2"])
                other = page.locator('#other-nodes tr[data-node="node2"][data-scheme="http"]')
                other.wait_for()
                cells = other.locator("td").all_inner_texts()
                assert cells[0] == node2.address and cells[1] == "http", cells
                assert cells[2:] == ["0", "–"], cells
                assert page.locator('#nodes tr[data-node="node2"]').count() == 0
                page.goto(f"{base(cluster)}/rollouts/{phase1}")
                page.wait_for_selector("#live.on")
                assert page.locator('#other-nodes tr[data-node="node2"]').count() == 1
                assert on_http_gauge(cluster, session) == {"node1": 0.0, "node2": 0.0}

                # The used link again, in the browser its use signed in: the schema.
                for again in (link, link + "/open"):
                    page.goto(again)
                    page.wait_for_url(base(cluster) + "/")
                    page.wait_for_selector("#live.on")
                # Anywhere else (no session, another grant's): still the 401 page.
                for cookie in (None, session):
                    for again in (path_of(link), path_of(link) + "/open"):
                        refused = fetch(cluster, again, cookie=cookie)
                        assert refused.status == 401, (again, refused.status)
                        assert 'data-reason="used"' in refused.body
                context.close()
        finally:
            if node2 is not None:
                node2.close()
