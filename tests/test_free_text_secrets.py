"""Secrets in free text the leader stores and lists again, and small CLI gaps (review s48rev3
Lows): ``token create --description``, ``viewer grant --name`` and ``ca|workstations revoke
--reason`` refuse a value that holds one of tlsroll's secrets, in the CLI (exit 2, before
anything is sent) and in the Admin service (INVALID_ARGUMENT, nothing stored), never repeating
it; ``client test-connection`` given a viewer login link refuses it without printing its
secret; ``init --data-dir`` with a control character makes nothing; ``rollout retry`` takes
``--yes`` as the commands that start a rollout do. The CLI runs as a process against a real
leader; the rules also as functions."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterator
from pathlib import Path

import click
import grpc
import pytest

from leader import admin_service, layout
from leader.store import Store
from leader.tokens import JoinToken
from leader.viewer.grants import Grants
from tests.cluster import Cluster, one_line_error
from tests.conftest import next_loopback
from tlsroll import echo
from tlsroll.cli import main
from tlsroll.errors import TerminalError
from tlsroll.password import generate_password
from tlsroll.rpc import RpcStatusError
from tlsroll.v1 import admin_pb2
from workstation.connection import check_url

TOKEN = str(JoinToken.generate())
TOKEN_ID = TOKEN.split(".", maxsplit=1)[0]
LINK_SECRET = secrets.token_urlsafe(32)
LINK = f"https://127.0.0.1:9444/login/{LINK_SECRET}"
PASSWORD = generate_password()
SECRETS = {"join token": TOKEN, "login link": LINK, "link secret": LINK_SECRET, "pw": PASSWORD}
NOTES = ["{}", "for the new node: {}", "see {}.", "({}), kept", "token={};x"]
"""A secret inside free text, as one pastes it."""

DNS_NOTES = [
    "backup server backup.hausarztpraxisdrschmidtbon.de",
    "server.zahnarztpraxisdrweberkoeln.de (front desk)",
    "praxis-dr-mueller.empfang.haus-raum-dach-west-sued-berg.de",
    "www.backup.hausarztpraxisdrschmidtbon.de.",
]
"""Notes that name a DNS name holding a secret's shape as one label (review s48rev3 M3)."""


def hidden(value: str) -> str:
    """The part of a secret that must never be printed or stored."""
    return value.split(".", 1)[1] if value == TOKEN else value.rsplit("/", 1)[-1]


STORED = ("tokens", "viewer_grants", "certificates", "audit")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("free-text"), next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


# --- the rule -----------------------------------------------------------------------------------


@pytest.mark.parametrize("note", NOTES)
@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_free_text_holding_a_secret_is_refused_without_it(kind: str, note: str) -> None:
    value = SECRETS[kind]
    problem = echo.free_text_problem(note.format(value), "--description")
    assert problem is not None
    assert problem.startswith("--description holds what looks like a"), problem
    assert hidden(value) not in problem
    if kind == "join token":
        assert f"(id {TOKEN_ID}; its secret not shown)" in problem


@pytest.mark.parametrize(
    "note", [*DNS_NOTES, "", "Dr. Huber, front desk", "sha256:" + "ab" * 32, "a" * 43, "x" * 300]
)
def test_free_text_without_a_secret_is_taken(note: str) -> None:
    assert echo.free_text_problem(note, "--description") is None


@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_the_admin_service_refuses_it_for_every_caller(kind: str) -> None:
    value = SECRETS[kind]
    for given in (f"note {value}", "x " * 150 + value, f"note {value[:10]}\x00{value[10:]}"):
        with pytest.raises(RpcStatusError) as refused:
            admin_service.free_text(given, "the token's description", 200)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert hidden(value) not in str(refused.value)
    assert admin_service.free_text("  a\tnote\n", "the reason", 200) == "a note"


def test_what_an_older_leader_stored_is_listed_without_the_secret(tmp_path: Path) -> None:
    """The store (which refuses nothing: the Admin service does) and the grants, as a leader of
    before session 49 left them, read back with each secret replaced by what it looks like."""
    store = Store(tmp_path / "leader.sqlite3")
    now = dt.datetime(2026, 12, 4, 9, 0, tzinfo=dt.UTC)
    for i, (kind, value) in enumerate(sorted(SECRETS.items())):
        store.add_token(
            f"t{i:05d}", "s" * 26, ttl=dt.timedelta(hours=1), uses=1,
            description=f"for {value}.", now=now, actor="test", node_name=f"n{i}",
            addresses=(f"127.1.2.{i + 1}",),
        )  # fmt: skip
        Grants(store.db).create(f"for {value}", ttl=dt.timedelta(hours=1), now=now, actor="a")
        listed = [t.description for t in store.list_tokens()][-1]
        named = Grants(store.db).all()[-1].name
        for text in (listed, named):
            assert hidden(value) not in text, (kind, text)
            assert "(not shown)>" in text or "secret not shown)>" in text, text
    store.add_token(
        "t99999", "s" * 26, ttl=dt.timedelta(hours=1), uses=1, description=DNS_NOTES[0],
        now=now, actor="test", node_name="n99", addresses=("127.1.2.99",),
    )  # fmt: skip
    assert store.list_tokens()[-1].description == DNS_NOTES[0]


FREE_TEXT_COMMANDS = [
    ("token", "create", "--node", "nx", "--address", "127.1.2.3", "--description", "{}"),
    ("viewer", "grant", "--name", "{}"),
    ("ca", "revoke", "5eed", "--reason", "{}"),
    ("workstations", "revoke", "ws-nosuch", "--reason", "{}"),
]


@pytest.mark.parametrize("args", FREE_TEXT_COMMANDS, ids=" ".join)
@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_the_cli_refuses_it_before_calling(
    args: tuple[str, ...], kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    value = SECRETS[kind]
    argv = ["--socket", "/nonexistent", *(a.replace("{}", f"for {value}.") for a in args)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "holds what looks like a" in lines[0], lines[0]
    assert "/nonexistent" not in lines[0]  # refused before the socket was tried
    assert hidden(value) not in captured.err + captured.out


# --- against a real leader ----------------------------------------------------------------------


@pytest.mark.parametrize("args", FREE_TEXT_COMMANDS, ids=" ".join)
@pytest.mark.parametrize("kind", ["join token", "login link", "pw"])
def test_a_secret_in_free_text_is_refused_and_nothing_stored(
    cluster: Cluster, args: tuple[str, ...], kind: str
) -> None:
    value = SECRETS[kind]
    before = cluster.store_rows(STORED)
    result = cluster.cli(*(a.replace("{}", f"for {value}") for a in args), input="")
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr, "tlsroll")
    assert "holds what looks like a" in line, line
    assert hidden(value) not in result.stderr + result.stdout
    assert cluster.store_rows(STORED) == before


@pytest.mark.parametrize("kind", ["join token", "login link", "pw"])
def test_the_leader_refuses_it_from_any_client_and_stores_nothing(
    cluster: Cluster, kind: str
) -> None:
    """The Admin service over its socket, as a client other than this CLI calls it."""
    note = f"for {SECRETS[kind]}"
    before = cluster.store_rows(STORED)
    requests = [
        ("CreateToken", admin_pb2.CreateTokenRequest(
            node_name="nx", addresses=["127.1.2.3"], description=note
        )),
        ("CreateViewerGrant", admin_pb2.CreateViewerGrantRequest(name=note)),
        ("RevokeCertificate", admin_pb2.RevokeCertificateRequest(
            name_or_serial="5eed", reason=note, unknown=True
        )),
    ]  # fmt: skip
    with cluster.admin() as admin:
        for method, request in requests:
            with pytest.raises(grpc.RpcError) as refused:
                getattr(admin, method)(request, timeout=10)
            details = refused.value.details() or ""
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, details)
            assert "holds what looks like a" in details, details
            assert hidden(SECRETS[kind]) not in details
    assert cluster.store_rows(STORED) == before


def test_notes_naming_dns_names_are_stored_and_listed(cluster: Cluster) -> None:
    note = DNS_NOTES[0]
    address = next_loopback()
    made = cluster.cli(
        "token", "create", "--node", "dns-note", "--address", address, "--description", note
    )
    assert made.returncode == 0, made.stderr
    assert note in cluster.cli("token", "list").stdout
    granted = cluster.cli("viewer", "grant", "--name", DNS_NOTES[1])
    assert granted.returncode == 0, granted.stderr
    assert DNS_NOTES[1] in cluster.cli("viewer", "list").stdout


# --- client test-connection given a login link -----------------------------------------------


def test_check_url_refuses_a_login_link_without_its_secret() -> None:
    for url in (LINK, f"https://leader.example:9444/login/{LINK_SECRET}/"):
        with pytest.raises(click.BadParameter) as refused:
            check_url(url)
        message = refused.value.format_message()
        assert "a viewer login link or its secret (not shown)" in message, message
        assert LINK_SECRET not in message
    server = check_url("https://backup.hausarztpraxisdrschmidtbon.de:8443/praxis_live/")
    assert server.host == "backup.hausarztpraxisdrschmidtbon.de"


def test_test_connection_never_prints_a_login_links_secret(
    cluster: Cluster, tmp_path: Path
) -> None:
    link = f"https://{cluster.address}:9444/login/{LINK_SECRET}"
    result = cluster.cli(
        "client",
        "test-connection",
        link,
        "--yes",
        "--no-enrol",
        "--ca-pin",
        cluster.ca_pin(),
        env={"HOME": str(tmp_path), "TLSROLL_CLIENT_DIR": str(tmp_path / "client")},
        input="",
    )
    assert LINK_SECRET not in result.stdout + result.stderr, result.stdout + result.stderr
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr, "tlsroll")
    assert "a viewer login link or its secret (not shown)" in line, line
    assert not (tmp_path / "client" / "settings.json").exists()


# --- init --data-dir with a control character ----------------------------------------------------


@pytest.mark.parametrize("bad", ["a\nb", "a\x1b[2Jb", "a\tb", "a\x7fb", "a\x85b"])
def test_init_refuses_a_data_dir_with_a_control_character(tmp_path: Path, bad: str) -> None:
    with Cluster(tmp_path / "c", next_loopback()) as c:
        where = tmp_path / "here"
        where.mkdir()
        result = c.cli("init", "--data-dir", str(where / bad), "--address", c.address)
        assert result.returncode == 2, result.stderr
        line = one_line_error(result.stderr, "tlsroll")
        assert "--data-dir" in line and "control character" in line, line
        assert "\x1b" not in result.stderr
        assert list(where.iterdir()) == []  # nothing made
        # and init itself, for any caller (a TerminalError before anything is made)
        with pytest.raises(TerminalError, match="holds a control character"):
            layout.init(where / bad, c.address)
        assert list(where.iterdir()) == []


# --- rollout retry --yes ----------------------------------------------------------------------


def test_rollout_retry_takes_yes_off_a_terminal(cluster: Cluster) -> None:
    """Retry asks nothing (it prints the change's warnings as `rollout start --yes` does): off a
    terminal, with --yes or without, it goes to the leader (which has no rollout to retry)."""
    for args in (("rollout", "retry", "--yes"), ("rollout", "retry")):
        result = cluster.cli(*args, input="")
        line = one_line_error(result.stderr, "tlsroll")
        assert result.returncode == 1, line
        assert "No such option" not in line and "not a terminal" not in line, line


# --- review s49sec2 ------------------------------------------------------------------------------

# Secrets of a fixed, valid shape holding a digit (as all but 1 in 200 of those made do: the
# exemption for names joined by "." or "-" takes only pieces without one).
TOKEN2 = "ab12cd.abcdefghij234567klmnopqrst"
PASSWORD2 = "ab2c-de3f-gh4j-km5n-pq6r-st7u"
LINK_SECRET2 = "Zq3_xV9-kLm2Np4Rs6Tu8Wy0Ab1Cd5Ef7Gh9Jk2Mn4P"
SAFELINK = (
    "https://eur01.safelinks.protection.outlook.com/?url=https%3A%2F%2Fleader%3A9444%2Flogin"
    f"%2F{LINK_SECRET2}&data=05%7C02"
)
HIDDEN_NOTES = {
    "link url-encoded": (SAFELINK, LINK_SECRET2),
    "link url-encoded lower case": (SAFELINK.replace("%2F", "%2f"), LINK_SECRET2),
    "link url-encoded twice": (SAFELINK.replace("%", "%25"), LINK_SECRET2),
    "token upper case": (f"token {TOKEN2.upper()}", TOKEN2.upper().split(".")[1]),
    "password upper case": (f"pw {PASSWORD2.upper()}", PASSWORD2.upper()),
    "token after a hyphen": (f"join-{TOKEN2}", TOKEN2.split(".")[1]),
    "token after dots": (f"siehe...{TOKEN2}", TOKEN2.split(".")[1]),
    "token before .text": (f"{TOKEN2}.neu", TOKEN2.split(".")[1]),
    "token before -text": (f"{TOKEN2}-alt", TOKEN2.split(".")[1]),
    "password after a hyphen": (f"pw-{PASSWORD2}", PASSWORD2),
    "password before .text": (f"{PASSWORD2}.neu", PASSWORD2),
}


@pytest.mark.parametrize("name", sorted(HIDDEN_NOTES))
def test_a_secret_encoded_upper_case_or_joined_is_found(name: str) -> None:
    """Review s49sec2 M1: each was stored and listed in full."""
    note, secret = HIDDEN_NOTES[name]
    problem = echo.free_text_problem(note, "--description")
    assert problem is not None, note
    assert secret not in problem and secret.lower() not in problem.lower()
    listed = echo.hide_inside(note)
    assert secret not in listed and "not shown" in listed, listed
    with pytest.raises(RpcStatusError) as refused:
        admin_service.free_text(note, "the grant's name", 200)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # the CLI's last word on an error hides it too (one rule for both)
    assert secret not in echo.scrub(note)


def _digests() -> list[str]:
    """SSH key fingerprints and HPKP-style pins of 200 digests: base64 of 256 bits, as a link's
    secret is, a quarter of them holding '-' or '_'-free runs of 43."""
    import base64
    import hashlib

    found = []
    for i in range(200):
        b64 = base64.b64encode(hashlib.sha256(f"key {i}".encode()).digest()).decode()
        found += [f"host key SHA256:{b64.rstrip('=')}", f'pin-sha256="{b64}"']
        found.append(f"sha256:{b64.rstrip('=')}")
    return found


@pytest.mark.parametrize(
    "note",
    [
        "Empfang-Praxis-Dr-Mueller-Bonn-Arbeitsplatz",
        "PC Empfang_Praxis_Dr_Mueller_Bonn_Arbeitsplatz (neu)",
        "server https://10.0.0.5:8443/Praxisverwaltung_DrMueller_Bonn_Live_DB2026/",
    ],
)
def test_names_and_paths_shaped_like_a_link_secret_are_taken(note: str) -> None:
    """Review s49sec2 L2: refused as "a viewer login link"."""
    assert echo.free_text_problem(note, "the grant's name") is None
    assert echo.hide_inside(note) == note


def test_digests_are_not_taken_for_a_login_link() -> None:
    refused = [d for d in _digests() if echo.free_text_problem(d, "--description") is not None]
    assert refused == []


def test_a_bare_login_secret_is_still_refused() -> None:
    for note in (
        LINK_SECRET2,
        f"secret: {LINK_SECRET2}",
        f"({LINK_SECRET2})",
        f"/login/{LINK_SECRET2}",
    ):
        assert echo.free_text_problem(note, "--description") is not None, note


def test_check_url_takes_a_path_shaped_like_a_link_secret() -> None:
    """Review s49sec2 L2: only a /login/ path is a login link."""
    server = check_url("https://10.0.0.5:8443/Praxisverwaltung_DrMueller_Bonn_Live_DB2026/")
    assert server.host == "10.0.0.5"
    for url in (f"https://l:9444/login/{LINK_SECRET2}", f"https://l:9444/login%2F{LINK_SECRET2}"):
        with pytest.raises(click.BadParameter) as refused:
            check_url(url)
        assert LINK_SECRET2 not in refused.value.format_message()


def test_the_leader_refuses_a_secret_as_a_tokens_names(cluster: Cluster) -> None:
    """Review s49sec2 L3: a client other than the CLI (whose not_a_secret refuses them) had a
    secret-shaped node name or DNS name stored, and listed."""
    before = cluster.store_rows(STORED)
    address = next_loopback()
    requests = [
        admin_pb2.CreateTokenRequest(node_name=TOKEN, addresses=[address]),
        admin_pb2.CreateTokenRequest(node_name=PASSWORD.upper(), addresses=[address]),
        admin_pb2.CreateTokenRequest(
            node_name="nx", addresses=[address], dns_names=["nx.example", LINK_SECRET]
        ),
        admin_pb2.CreateTokenRequest(node_name="nx", addresses=[address], dns_names=[LINK]),
    ]
    with cluster.admin() as admin:
        for request in requests:
            with pytest.raises(grpc.RpcError) as refused:
                admin.CreateToken(request, timeout=10)
            details = refused.value.details() or ""
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
            assert "looks like a" in details, details
            for value in SECRETS.values():
                assert hidden(value) not in details and hidden(value).upper() not in details
    assert cluster.store_rows(STORED) == before


def test_init_refuses_a_data_dir_that_is_no_utf8(tmp_path: Path) -> None:
    """Review s49sec2 L4: a relative --data-dir under a working directory with a byte of
    another encoding: init made the CA, then failed writing leader.toml (blamed on
    --address), and a re-run called the directory interrupted."""
    import os
    import subprocess

    from tests.cluster import child_env, command

    where = os.fsencode(tmp_path) + b"/Praxis-M\xfcller"
    os.mkdir(where)
    address = next_loopback()
    env = child_env()  # its PYTHONPATH as from this directory (the child's is another)
    env["PYTHONPATH"] = os.pathsep.join(
        str(Path(p).absolute()) for p in env["PYTHONPATH"].split(os.pathsep) if p
    )
    result = subprocess.run(
        [*command("tlsroll", "tlsroll"), "init", "--data-dir", "data", "--address", address],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr, "tlsroll")
    assert "--data-dir" in line and "UTF-8" in line, line
    assert os.listdir(where) == []
    with pytest.raises(TerminalError, match="UTF-8"):
        layout.init(Path(os.fsdecode(where)) / "data", address)
    assert os.listdir(where) == []
