"""The admin CLI's errors (review s47rtin L5, L6, L8, L9 and "the CLI has no catch-all"): one
line whatever the input holds, input repeated at most some 80 characters, never one of
tlsroll's secrets, one rule for exit codes, and one line for an error nobody foresaw. The CLI
runs as a process against a real leader; the shapes of the secrets (``tlsroll.echo``) are
checked against what makes them."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import grpc
import pytest

from leader.cli import cluster_cmd
from leader.rollout_core import RolloutAction
from leader.tokens import JoinToken
from leader.wire import ROLLOUT_ACTION
from tests.cluster import Cluster, child_env, one_line_error
from tests.conftest import next_loopback
from tlsroll import echo, names
from tlsroll.cli import main
from tlsroll.password import generate_password
from tlsroll.v1 import admin_pb2

LONG = "A" * 100_000
BROKEN = "ab\ncd\x1b[2J"  # a line end and an escape sequence that clears the screen
TOKEN = str(JoinToken.generate())
TOKEN_ID = TOKEN.split(".", maxsplit=1)[0]


def _link_secret() -> str:
    """A login link's secret as leader.viewer.grants makes it, not beginning with '-' (1 in 64
    do: given as an argument, the command line reads it as an option, "No such option '-V'",
    and the tests below about how the value is named failed: ci50b)."""
    while (made := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return made


LINK_SECRET = _link_secret()
LINK = f"https://127.0.0.1:9444/login/{LINK_SECRET}"
PASSWORD = generate_password()
SECRETS = {"join token": TOKEN, "login link": LINK, "link secret": LINK_SECRET, "pw": PASSWORD}


def _hidden(value: str) -> str:
    """The part of a secret that must never be printed."""
    return value.split(".", 1)[1] if value == TOKEN else value.rsplit("/", 1)[-1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("echo"), next_loopback()) as c:
        c.init()
        c.start_leader()
        yield c


def error_line(result: subprocess.CompletedProcess[str], code: int | None = None) -> str:
    """The one error line (no traceback, nothing after it), short, with nothing in it that
    acts on a terminal; ``code``: the exit code it must have."""
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stderr[:500])
    else:
        assert result.returncode != 0, result.stderr[:500]
    line = one_line_error(result.stderr, "tlsroll")
    assert line.startswith("tlsroll: error: "), line
    assert "\x1b" not in result.stderr, line
    return line


# --- the shapes ---------------------------------------------------------------------------------


def test_every_secret_tlsroll_makes_is_recognised_and_never_shown() -> None:
    for _ in range(200):
        made = [
            str(JoinToken.generate()),
            secrets.token_urlsafe(32),
            f"https://leader.example:9444/login/{secrets.token_urlsafe(32)}",
            generate_password(),
        ]
        for value in made:
            assert echo.secret_kind(value) is not None, value
            assert _hidden(value) not in echo.shown(value)
            assert _hidden(value) not in echo.scrub(f"no rollout {value!r}: see …")
    token = JoinToken.generate()
    assert echo.shown(str(token)) == f"<a join token (id {token.id}; its secret not shown)>"


@pytest.mark.parametrize(
    "value",
    [
        "node-1",
        "ws-front-desk",
        "r20261204-101010-ab12",
        "sha256:" + "ab" * 32,  # a pin or fingerprint
        "5eed" * 10,  # a serial
        "a" * 43,  # lower case: a node or DNS name, not a 256-bit secret
        "/var/lib/tlsroll/run/admin.sock",
    ],
)
def test_what_is_no_secret_is_shown_as_it_is(value: str) -> None:
    assert echo.secret_kind(value) is None
    assert echo.shown(value) == repr(value)


def test_shown_is_one_escaped_line_of_at_most_80_characters_and_the_length() -> None:
    assert echo.shown(BROKEN) == "'ab\\ncd\\x1b[2J'"
    assert echo.shown(LONG) == "'" + "A" * 79 + "…' (100000 characters)"
    assert echo.shown_path("/tmp/a\nb") == "/tmp/a\\nb"


def test_a_refused_name_is_repeated_as_shown_and_echo_imported_by_the_first_refusal() -> None:
    """Session 53 (issue 15): ``tlsroll.names`` imports ``echo`` (its secrets' shapes compiled
    as it is imported) at its first refusal, not with itself: the agent's crypto worker's
    child makes a rollout's first key for names it never refuses. Its refusals repeat the
    input as ``shown`` does all the same."""
    code = (
        "import sys\n"
        "from tlsroll import names\n"
        "print('tlsroll.echo' in sys.modules)\n"
        "assert names.node_name_problem('node9') is None\n"
        "assert names.dns_problem('node9.example.org') is None\n"
        "print('tlsroll.echo' in sys.modules)\n"
        "assert names.node_name_problem('Node9') is not None\n"
        "print('tlsroll.echo' in sys.modules)\n"
    )
    run = subprocess.run(
        [sys.executable, "-P", "-c", code],
        env=child_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False", "True"]
    for problem in (names.node_name_problem, names.dns_problem, names.ip_problem):
        for value in (LONG, BROKEN):
            assert echo.shown(value) in str(problem(value)), problem
    for problem in (names.node_name_problem, names.ip_problem):
        said = str(problem(TOKEN))
        assert TOKEN not in said
        assert f"<a join token (id {TOKEN_ID}; its secret not shown)>" in said


# --- L5: one line, input cut -------------------------------------------------------------------

ECHOING = [
    (("nodes", "remove", "{}", "--yes"), 1),
    (("token", "revoke", "{}"), 2),  # no token id's shape (session 56's README walk)
    (("ca", "revoke", "{}"), 2),
    (("workstations", "revoke", "{}"), 2),
    (("viewer", "revoke", "{}"), 2),
    (("rollout", "pause", "{}"), 2),  # no rollout id's shape (review s48rev3 L4)
    (("rollout", "rollback", "{}", "--yes"), 2),
    (("notify", "--rollout", "{}"), 2),
    (("plan", "--nodes", "{}"), 1),
    (("notify", "--timezone", "{}", "--remaining"), 2),
    (("notify", "--when", "{}"), 2),
    (("token", "create", "--node", "{}", "--address", "127.1.2.3"), 2),
    (("token", "create", "--node", "nx", "--address", "{}"), 2),
    (("token", "create", "--node", "nx", "--address", "127.1.2.3", "--dns", "{}"), 2),
    (("token", "create", "--node", "nx", "--address", "127.1.2.3", "--ttl", "{}"), 2),
    (("{}",), 2),
    (("nodes", "{}"), 2),
    (("password", "set", "--password-file", "{}"), 2),
    (("--socket", "{}", "nodes"), 1),
    (("--data-dir", "{}", "nodes"), 1),
    (("client", "test-connection", "{}"), 2),
    (("client", "test-connection", "https://127.1.2.3:8443/p/", "--settings-dir", "/x/{}"), 2),
]
ECHOING_IDS = [" ".join(args) for args, _ in ECHOING]


@pytest.mark.parametrize(("args", "code"), ECHOING, ids=ECHOING_IDS)
def test_a_100_kb_argument_comes_back_cut_in_one_line(
    cluster: Cluster, args: tuple[str, ...], code: int
) -> None:
    line = error_line(cluster.cli(*(a.replace("{}", LONG) for a in args), input=""), code)
    assert len(line) < 400, line[:600]
    assert "A" * 200 not in line  # (a path is cut at 200 characters, any other input at 80)


@pytest.mark.parametrize(("args", "code"), ECHOING, ids=ECHOING_IDS)
def test_a_line_end_or_escape_in_an_argument_stays_in_its_one_line(
    cluster: Cluster, args: tuple[str, ...], code: int
) -> None:
    del code  # (the same input may be refused for its shape first)
    error_line(cluster.cli(*(a.replace("{}", BROKEN) for a in args), input=""))


def test_the_leaders_details_cut_what_they_repeat(cluster: Cluster) -> None:
    """The leader's own refusals (over the admin socket, as any caller gets them)."""
    pause = ROLLOUT_ACTION.wire(RolloutAction.PAUSE)
    with cluster.admin() as admin:
        calls: list[Callable[[], object]] = [
            lambda: admin.RemoveNode(admin_pb2.RemoveNodeRequest(name="B" * 3_000_000), timeout=10),
            lambda: admin.ControlRollout(
                admin_pb2.ControlRolloutRequest(rollout_id="B" * 100_000, action=pause),
                timeout=10,
            ),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as refused:
                call()
            details = refused.value.details() or ""
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND, details[:300]
            assert "(3000000 characters)" in details or "(100000 characters)" in details
            assert len(details) < 200, details[:300]
        # An id of a shape no token or grant has: refused as such, without repeating it.
        shapeless: list[Callable[[], object]] = [
            lambda: admin.RevokeToken(admin_pb2.RevokeTokenRequest(id="B" * 100_000), timeout=10),
            lambda: admin.RevokeViewerGrant(
                admin_pb2.RevokeViewerGrantRequest(id="B" * 100_000), timeout=10
            ),
        ]
        for call in shapeless:
            with pytest.raises(grpc.RpcError) as refused:
                call()
            details = refused.value.details() or ""
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details[:300]
            assert "BBB" not in details and len(details) < 200, details[:300]


# --- L8: no secret repeated ------------------------------------------------------------------

ID_COMMANDS = [
    ("nodes", "remove", "{}", "--yes"),
    ("ca", "revoke", "{}"),
    ("workstations", "revoke", "{}"),
    ("viewer", "revoke", "{}"),
    ("rollout", "status", "{}"),
    ("rollout", "abort", "{}"),
    ("schema", "show", "--rollout", "{}"),
    ("notify", "--rollout", "{}"),
]


@pytest.mark.parametrize("kind", sorted(SECRETS))
@pytest.mark.parametrize("args", ID_COMMANDS, ids=" ".join)
def test_a_secret_given_for_an_id_is_named_not_repeated(
    cluster: Cluster, args: tuple[str, ...], kind: str
) -> None:
    value = SECRETS[kind]
    result = cluster.cli(*(a.replace("{}", value) for a in args), input="")
    line = error_line(result, 2)
    assert _hidden(value) not in result.stderr + result.stdout
    assert "this looks like a" in line and "; give " in line, line
    if kind == "join token":
        assert f"a join token (id {TOKEN_ID}; its secret not shown)" in line, line


@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_a_secret_anywhere_else_is_not_repeated_either(cluster: Cluster, kind: str) -> None:
    value = SECRETS[kind]
    for args in (
        ("notify", "--when", value),
        ("token", "create", "--node", value, "--address", "127.1.2.3"),
        ("token", "create", "--node", "n", "--address", "127.1.2.3", "--dns", value),
        (value,),
        ("--socket", value, "nodes"),
        ("password", "set", "--password-file", value),
    ):
        result = cluster.cli(*args, input="")
        error_line(result)
        assert _hidden(value) not in result.stderr + result.stdout, (args, result.stderr)


def test_token_revoke_takes_a_whole_token_but_refuses_another_secret(cluster: Cluster) -> None:
    line = error_line(cluster.cli("token", "revoke", TOKEN), 1)  # its id: not found
    assert f"no join token with id '{TOKEN_ID}'" in line, line
    result = cluster.cli("token", "revoke", LINK_SECRET)
    assert "a viewer login link" in error_line(result, 2)
    assert LINK_SECRET not in result.stderr


# --- review s48rev3 M3: a name that merely holds a piece shaped like a secret is a name ---------

# Real names of practices: a 6-character label, then one of 26 letters (a join token's shape
# inside it), or six groups of 4 (a generated password's).
NAMES_WITH_A_SECRETS_SHAPE = [
    "backup.hausarztpraxisdrschmidtbon.de",
    "server.zahnarztpraxisdrweberkoeln.de",
    "praxis-dr-mueller.empfang.haus-raum-dach-west-sued-berg.de",
]


@pytest.mark.parametrize("name", NAMES_WITH_A_SECRETS_SHAPE)
def test_a_dns_name_holding_a_secrets_shape_is_taken_as_a_name(name: str) -> None:
    assert echo.secret_kind(name) is not None  # (hidden inside free text, as before)
    assert echo.whole_secret_kind(name) is None


def test_token_create_takes_long_practice_dns_and_node_names(cluster: Cluster) -> None:
    address = next_loopback()
    args = ["token", "create", "--node", "praxis-dr-schmidt-bonn-backup", "--address", address]
    for name in NAMES_WITH_A_SECRETS_SHAPE:
        args += ["--dns", name]
    result = cluster.cli(*args)
    assert result.returncode == 0, result.stderr
    assert "praxis-dr-schmidt-bonn-backup" in cluster.cli("token", "list").stdout


@pytest.mark.parametrize("kind", sorted(SECRETS))
@pytest.mark.parametrize("option", ["--node", "--dns"])
def test_a_whole_secret_given_as_a_name_is_still_refused(
    cluster: Cluster, kind: str, option: str
) -> None:
    value = SECRETS[kind]
    for given in (value, f"  {value}\n"):
        args = ["token", "create", "--node", "n", "--address", "127.1.2.3", option, given]
        result = cluster.cli(*args)
        line = error_line(result, 2)
        assert "this looks like a" in line, line
        assert _hidden(value) not in result.stderr + result.stdout


# --- review s48rev3 L1: an argument that is not UTF-8 is a usage error -----------------------

LATIN1 = "M\udcfcller"  # b"M\xfcller" (Latin-1) as Python holds it


@pytest.mark.parametrize(
    "args",
    [
        ("viewer", "grant", "--name", LATIN1),
        ("nodes", "remove", LATIN1, "--yes"),
        ("token", "create", "--node", "n", "--address", "127.1.2.3", "--description", LATIN1),
        ("plan", "--nodes", LATIN1),
    ],
    ids=" ".join,
)
def test_an_argument_that_is_not_utf8_is_a_usage_error(
    cluster: Cluster, args: tuple[str, ...]
) -> None:
    line = error_line(cluster.cli(*args, input=""), 2)
    assert "is not UTF-8 text" in line, line


# --- L6: one rule for exit codes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        # a malformed serial: usage (2)
        (("ca", "revoke", ""), 2, "is not a serial: hex digits"),
        (("ca", "revoke", "zz"), 2, "is not a serial: hex digits"),
        (("ca", "revoke", "0x10"), 2, "is not a serial: hex digits"),
        (("ca", "revoke", "0"), 2, "not a serial this CA can have issued"),
        (("workstations", "revoke", ""), 2, "neither a workstation name"),
        (("workstations", "revoke", "00"), 2, "not a serial this CA can have issued"),
        (("workstations", "revoke", "zz"), 2, "neither a workstation name"),
        (("workstations", "revoke", "ws-BAD NAME"), 2, "is not a workstation name"),
        # a malformed rollout id: usage (2) for every command that takes one (review s48rev3 L4)
        (("rollout", "status", "bad id!"), 2, "not a rollout id"),
        (("rollout", "pause", "bad id!"), 2, "not a rollout id"),
        (("rollout", "resume", "bad id!"), 2, "not a rollout id"),
        (("rollout", "abort", "bad id!"), 2, "not a rollout id"),
        (("rollout", "finalize", "bad id!", "--yes"), 2, "not a rollout id"),
        (("rollout", "rollback", "bad id!", "--yes"), 2, "not a rollout id"),
        (("rollout", "retry", "bad id!"), 2, "not a rollout id"),
        (("notify", "--rollout", "bad id!"), 2, "not a rollout id"),
        (("notify", "--cert-dir", "/"), 2, "--cert-dir goes with --when"),
        (
            (
                "notify",
                "--when",
                "2099-12-05 18:00",
                "--change",
                "change-password",
                "--cert-dir",
                "/",
            ),
            2,
            "--cert-dir goes with --change enable-tls or rotate-cert",
        ),
        (("schema", "show", "--rollout", "bad id!"), 2, "not a rollout id"),
        # an empty one given: usage (2), never "the active or newest rollout" (review s63 ops
        # M4: `rollout rollback "$RID" --yes` with RID unset took the whole cluster back)
        *(
            ((*command, ""), 2, "an empty rollout id: give one")
            for command in (
                ("rollout", "status"),
                ("rollout", "pause"),
                ("rollout", "resume"),
                ("rollout", "abort"),
                ("rollout", "finalize", "--yes"),
                ("rollout", "rollback", "--yes"),
                ("rollout", "retry"),
                ("notify", "--rollout"),
                ("schema", "show", "--rollout"),
            )
        ),
        (
            ("token", "revoke", "bad id"),
            2,
            "a join token's id is 6 lower-case letters and digits, as `tlsroll token list` lists"
            " them (see: tlsroll token revoke --help)",
        ),
        # a duration names its option (it said "Invalid value: '0'")
        (
            ("token", "create", "--node", "nx", "--address", "127.1.2.3", "--ttl", "0h"),
            2,
            "Invalid value for --ttl: '0h': give more than 0",
        ),
        (("viewer", "grant", "--ttl", "0"), 2, "Invalid value for --ttl: '0': use a number"),
        (("rollout", "finalize", "r1", "--when-quiet", "9x", "--yes"), 2, "for --when-quiet: '9x'"),
        (("viewer", "revoke", "BADID1"), 2, "a viewer grant's id is 6 lower-case letters"),
        # well-formed, but nothing has it: a failure (1)
        (("ca", "revoke", "5eed"), 1, "no certificate with serial 5eed is on record"),
        (("workstations", "revoke", "ws-nosuch"), 1, "no unrevoked certificate matches"),
        (("nodes", "remove", "nosuch", "--yes"), 1, "no enrolled node named 'nosuch'"),
        (("rollout", "status", "nosuch"), 1, "no rollout 'nosuch'"),
        (("rollout", "finalize", "nosuch", "--yes"), 1, "no rollout 'nosuch'"),
        (("rollout", "rollback", "nosuch", "--yes"), 1, "no rollout 'nosuch'"),
        (("plan", "--nodes", "nosuch"), 1, "not enrolled: nosuch "),
        (("notify", "--when", "2099-12-05 18:00", "--nodes", "nosuch"), 1, "not enrolled"),
        (("viewer", "revoke", "nosuch"), 1, "no viewer grant with id 'nosuch'"),
        # asked without a terminal and without --yes: usage (2), before anything is done
        (("nodes", "remove", "nosuch"), 2, "not a terminal: add --yes"),
        (("epoch", "advance"), 2, "not a terminal: add --yes"),
        (("rollout", "finalize"), 2, "not a terminal: add --yes"),
    ],
)
def test_malformed_is_usage_unknown_is_a_failure(
    cluster: Cluster, args: tuple[str, ...], code: int, says: str
) -> None:
    before = cluster.store_rows(("certificates", "meta", "nodes", "audit"))
    line = error_line(cluster.cli(*args, input="y\n"), code)
    assert says in line, line
    assert cluster.store_rows(("certificates", "meta", "nodes", "audit")) == before


def test_the_leader_calls_a_malformed_serial_invalid_not_unknown(cluster: Cluster) -> None:
    with cluster.admin() as admin:
        for value in ("-1", "0x10", "f" * 100_000, "", "0"):
            request = admin_pb2.RevokeCertificateRequest(name_or_serial=value, unknown=True)
            with pytest.raises(grpc.RpcError) as refused:
                admin.RevokeCertificate(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, value[:20]
            assert len(refused.value.details() or "") < 200


# --- a catch-all in the entry point ----------------------------------------------------------


def test_an_error_nobody_foresaw_is_one_line_with_its_type_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError(f"bug holding {PASSWORD}")

    monkeypatch.setattr(cluster_cmd, "parse_duration", boom)
    monkeypatch.delenv("TLSROLL_DEBUG", raising=False)
    argv = ["--socket", "/nonexistent", "token", "create", "--node", "n", "--address", "1.2.3.4"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "tlsroll: error: internal error: RuntimeError; run it again with TLSROLL_DEBUG=1 for "
        "the traceback, and report it"
    ]
    monkeypatch.setenv("TLSROLL_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(argv)


def test_click_usage_errors_are_not_caught_as_internal(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nodes", "remove"]) == 2
    assert "internal error" not in capsys.readouterr().err
    assert issubclass(click.UsageError, Exception)  # (why the catch-all comes last)


# --- L9: test-connection reads its password file before it touches the network ---------------


def test_test_connection_refuses_a_bad_password_file_before_any_connection(
    cluster: Cluster, tmp_path: Path
) -> None:
    address = next_loopback()
    listeners = []
    for port in (8443, 8080, 9443):
        server = socket.socket()
        server.bind((address, port))
        server.listen(8)
        server.setblocking(False)
        listeners.append(server)
    secret = tmp_path / "pw"
    secret.write_text("correct horse battery staple\n")
    secret.chmod(0o644)
    try:
        result = cluster.cli(
            "client",
            "test-connection",
            f"https://{address}:8443/praxis_live/",
            "--password-file",
            str(secret),
            "--bootstrap-port",
            "9443",
            env={"HOME": str(tmp_path), "TLSROLL_CLIENT_DIR": str(tmp_path / "client")},
            input="",
        )
        line = error_line(result, 2)
        assert "accessible by others" in line, line
        for server in listeners:
            with pytest.raises(BlockingIOError):
                server.accept()  # nobody connected
    finally:
        for server in listeners:
            server.close()
