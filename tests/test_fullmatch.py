"""Names are matched whole: a trailing newline is not part of a valid name anywhere.

``re.match`` with a ``$``-anchored pattern accepts ``"node9\\n"`` (``$`` matches before a final
newline): the audit enrolled a node ``node9\\n`` that ``tlsroll nodes`` shows as ``node9``. Every
name check uses ``fullmatch``; a scan of the source keeps it that way.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from leader.tokens import JoinToken, MalformedToken
from nodeagent.service import ROLLOUT_ID
from refserver import config as refserver_config
from tests.cluster import Cluster, csr_pem, enrol, enrol_request
from tests.conftest import next_loopback
from tlsroll import bootstrap_protocol, pki
from tlsroll.bootstrap_protocol import BootstrapError

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("leader", "nodeagent", "tlsroll", "workstation", "refserver", "deploy", "tools")


def test_node_name_with_a_trailing_newline_is_refused() -> None:
    assert pki.node_name_problem("node9") is None
    for bad in ("node9\n", "node9\r\n", "\nnode9", "node9 "):
        assert pki.node_name_problem(bad) is not None, repr(bad)


def test_rollout_id_with_a_trailing_newline_is_refused() -> None:
    assert ROLLOUT_ID.fullmatch("r-20261130.1")
    for bad in ("r1\n", "r1\r\n", "\nr1"):
        assert not ROLLOUT_ID.fullmatch(bad), repr(bad)


def test_workstation_name_with_a_trailing_newline_is_refused() -> None:
    def start(name: str) -> bytes:
        msg = {"version": bootstrap_protocol.VERSION, "workstation": name, "msg_a": "AAAA"}
        return json.dumps(msg).encode()

    assert bootstrap_protocol.parse_start_request(start("ws-pc1")).workstation == "ws-pc1"
    with pytest.raises(BootstrapError):
        bootstrap_protocol.parse_start_request(start("ws-pc1\n"))
    key = pki.generate_key()
    good = csr_pem(key, "ws-pc1", [], ["ws-pc1"])
    assert bootstrap_protocol.check_workstation_csr(good)[1] == "ws-pc1"
    with pytest.raises(BootstrapError, match="not ws-<name>"):
        bootstrap_protocol.check_workstation_csr(csr_pem(key, "ws-x\n", []))


def test_token_and_app_path_are_matched_whole() -> None:
    token = JoinToken.generate()
    assert JoinToken.parse(str(token)) == token
    with pytest.raises(MalformedToken):
        JoinToken.parse(f"{token}\nextra")
    assert refserver_config._APP_PATH.fullmatch("/praxis_live/")
    assert not refserver_config._APP_PATH.fullmatch("/praxis_live/\n")


def _dollar_anchored(node: ast.Call) -> str | None:
    """The pattern of ``re.compile/match/search(PATTERN, ...)`` if it ends with an unescaped
    ``$`` (which also matches before a final newline), else None."""
    func = node.func
    if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)):
        return None
    if func.value.id != "re" or func.attr not in {"compile", "match", "search"}:
        return None
    if not node.args:
        return None
    arg = node.args[0]
    parts = arg.values if isinstance(arg, ast.JoinedStr) else [arg]
    last = parts[-1] if parts else None
    if isinstance(last, ast.Constant) and isinstance(last.value, str):
        text = last.value
        if text.endswith("$") and not text.endswith("\\$"):
            return text
    return None


def test_no_dollar_anchored_patterns_in_the_code() -> None:
    """``$`` in a pattern lets a trailing newline through: use ``fullmatch`` (or ``\\Z``)."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and (pattern := _dollar_anchored(node)):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {pattern!r}")
    assert found == []


# --- end to end: a real leader -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("fullmatch"), next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


def test_enrolment_of_a_name_with_a_newline_is_invalid_argument(cluster: Cluster) -> None:
    """The audit's request: claim and CSR both say ``node9\\n``; it must not enrol."""
    address = next_loopback()
    token = cluster.create_token("node9", address, uses=1)  # the admin meant node9
    key = pki.generate_key()
    request = enrol_request(
        token, "node9\n", address, key=key, csr=csr_pem(key, "node9\n", [address])
    )
    with pytest.raises(grpc.RpcError) as info:
        enrol(cluster, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "node name" in (info.value.details() or "")
    assert [n["name"] for n in cluster.store_table("nodes")] == []
