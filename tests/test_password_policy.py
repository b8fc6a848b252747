"""The policy for an admin-chosen auth password (leader.password_policy) and how the admin CLI
applies it: ``password set`` and ``rollout start`` with ``--password-file`` refuse a weak one
with one line saying why (exit 2), before the leader is contacted; ``--generate`` passes."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from leader import password_policy
from tlsroll import cli, contract, password
from tlsroll.v1 import admin_pb2, admin_pb2_grpc


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        ("Praxis2026!", "too short: at least 12 characters, it has 11"),
        ("password1234", "one of the 30,000 most common passwords"),
        ("PASSWORD1234", "one of the 30,000 most common passwords"),
        ("hunter2hunter2", "too easy to guess (about 10^4 guesses, at least 10^10 needed)"),
        ("Passwort1234", "too easy to guess"),
        ("Sommer2024!!", "too easy to guess"),  # the practice's words count as known
        ("Praxis-Dr-Huber", "too easy to guess"),
        ("qwertzuiopasdf", "too easy to guess"),
    ],
)
def test_weak_passwords_are_refused_with_a_reason(secret: str, why: str) -> None:
    problem = password_policy.problem(secret)
    assert problem is not None and why in problem
    assert "\n" not in problem and secret not in problem  # one line, never the password


@pytest.mark.parametrize(
    "secret",
    [
        "correct horse battery staple",
        "Umstellung auf https im Dezember, Praxis Süd",
        "first-password-kd7q-x2mf",
        # Longer than the estimator takes: its first 72 characters are judged.
        "Die Umstellung der Praxis auf https ist am ersten Dezember, bitte vorher sichern",
    ],
)
def test_strong_passwords_pass(secret: str) -> None:
    assert password_policy.problem(secret) is None


def test_long_input_is_judged_by_its_beginning() -> None:
    assert "too easy" in str(password_policy.problem("x" * 500))


def test_generated_passwords_always_pass() -> None:
    for _ in range(20):
        assert password_policy.problem(password.generate_password()) is None


@pytest.mark.parametrize(
    ("args", "instead"),
    [
        (["password", "set"], "; make it longer; or use --generate"),
        (
            ["rollout", "start", "--scope", "cluster", "--yes"],
            "; make it longer; or leave --password-file out on a terminal: a password is then",
        ),
    ],
    ids=["password-set", "rollout-start"],
)
def test_the_admin_cli_refuses_a_weak_password_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], instead: str
) -> None:
    """Exit 2 and one line, before anything is contacted (the socket leads nowhere), naming
    the command's own way to a generated password (`rollout start` has no --generate: it said
    "use --generate" there too, session 56's README walk)."""
    path = tmp_path / "pw"
    path.touch(0o600)
    path.write_text("hunter2hunter2\n")
    socket = tmp_path / "no-leader.sock"
    code = cli.main(["--socket", str(socket), *args, "--password-file", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("tlsroll: error: ")
    assert "--password-file" in err and "too easy to guess" in err and instead in err
    assert "hunter2hunter2" not in err


# A password of the generated shape written otherwise (review s69 revpass L2): a workstation
# folds such input (case, separators) to the generated form before the exchange, so a chosen
# one of that shape must already be in that form, or folding would make it a wrong password.
CANONICAL = "kd7q-x2mf-9vhc-3ptw-a8ke-rn5d"


@pytest.mark.parametrize(
    "secret",
    ["KD7Q-X2MF-9VHC-3PTW-A8KE-RN5D", "kd7q x2mf 9vhc 3ptw a8ke rn5d", "kd7qx2mf9vhc3ptwa8kern5d"],
)
@pytest.mark.parametrize(
    "args", [["password", "set"], ["rollout", "start", "--scope", "cluster", "--yes"]]
)
def test_the_admin_cli_refuses_a_generated_shape_not_written_as_generated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], secret: str, args: list[str]
) -> None:
    """Exit 2 and one line before anything is contacted, never the password; the canonical
    form passes these checks (and then finds no leader: exit 3 or 4, not 2)."""
    path = tmp_path / "pw"
    path.touch(0o600)
    path.write_text(secret + "\n")
    socket = tmp_path / "no-leader.sock"
    code = cli.main(["--socket", str(socket), *args, "--password-file", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("tlsroll: error: ")
    assert "--password-file" in err and "shape of a generated password" in err, err
    assert "lower case" in err and secret not in err and CANONICAL not in err
    path.write_text(CANONICAL + "\n")
    code = cli.main(["--socket", str(socket), *args, "--password-file", str(path)])
    err = capsys.readouterr().err
    assert code != 2 and "no admin socket" in err, err


# --- the nodes' names as known words (session 69 left them out) -------------------------------

NODE = "kardiologie-ost"
DNS = "srv7.praxis-weber.example"


def test_the_nodes_names_and_their_parts_are_known_words() -> None:
    from leader.cli.password import name_words

    words = name_words([NODE, DNS, "n1", "Empfang"])
    assert words == (
        "kardiologie-ost",
        "kardiologie",
        "ost",
        "srv7.praxis-weber.example",
        "srv7",
        "praxis-weber",
        "example",
        "praxis",
        "weber",
        "empfang",
    )
    # "<node name>2026!" passes the policy alone (a word zxcvbn does not know), not with it
    for secret, name in (("kardiologie-ost2026!", NODE), ("Praxis-Weber2026!#", DNS)):
        assert password_policy.problem(secret) is None, secret
        why = password_policy.problem(secret, name_words([name]))
        assert why is not None and "too easy to guess" in why, secret


class _Leader(admin_pb2_grpc.AdminServicer):
    """The two calls `password set --password-file` makes: the nodes, and the staging."""

    def __init__(self) -> None:
        self.staged: list[str] = []

    def ListNodes(self, request: Any, context: Any) -> admin_pb2.ListNodesResponse:
        context.send_initial_metadata(contract.announced())  # this code, as the leader says
        return admin_pb2.ListNodesResponse(
            nodes=[admin_pb2.NodeInfo(name=NODE, dns_names=[DNS]), admin_pb2.NodeInfo(name="n2")]
        )

    def SetPassword(self, request: Any, context: Any) -> admin_pb2.SetPasswordResponse:
        context.send_initial_metadata(contract.announced())
        self.staged.append(request.auth_verifier_json)
        return admin_pb2.SetPasswordResponse(version=len(self.staged))


@pytest.fixture
def listing_leader(tmp_path: Path) -> Iterator[tuple[Path, _Leader]]:
    """A gRPC server on a Unix socket answering as the leader's admin socket does (in
    process: the point is what the CLI asks and judges, not the leader)."""
    sock = tmp_path / "admin.sock"
    servicer = _Leader()  # type: ignore[abstract]  # only the calls under test
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    try:
        yield sock, servicer
    finally:
        server.stop(None).wait(30)


@pytest.mark.parametrize("secret", ["kardiologie-ost2026!", "Praxis-Weber2026!#"])
def test_password_set_judges_a_chosen_password_with_the_nodes_names(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    listing_leader: tuple[Path, _Leader],
    secret: str,
) -> None:
    """A password made of a node's name (or a part of its DNS name) and a year is as weak as
    one of a word and a year: refused with one line (exit 2) once the leader named its
    nodes, before it is asked to stage it; a strong one is staged as before."""
    sock, leader = listing_leader
    path = tmp_path / "pw"
    path.touch(0o600)
    path.write_text(secret + "\n")
    code = cli.main(["--socket", str(sock), "password", "set", "--password-file", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("tlsroll: error: "), err
    assert "too easy to guess" in err and "the nodes' names count as known words" in err, err
    assert "or use --generate" in err and secret not in err
    assert leader.staged == []
    path.write_text("kardiologie-ost-Zugspitze-Lerche-82!\n")
    code = cli.main(["--socket", str(sock), "password", "set", "--password-file", str(path)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "password version 1 staged." in out.out and len(leader.staged) == 1
