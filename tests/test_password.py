"""tlsroll.password: generated passwords, scrypt verifiers, their JSON form and validation, and
the one rule for a ``--password-file`` (the admin CLI's and the workstation's)."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import pytest

from tlsroll import bootstrap_protocol as proto
from tlsroll import cli, kdfhook, keywrap, password
from tlsroll.errors import TlsrollError
from tlsroll.password import (
    PasswordFileError,
    check_password,
    generate_password,
    make_verifier,
    read_password_file,
    verifier_from_json,
    verifier_to_json,
)

if TYPE_CHECKING:
    from nodeagent.config import AgentConfig

FAST = password.TEST_PARAMS


@pytest.fixture(scope="module")
def verifier() -> password.Verifier:
    return make_verifier("kd7q-x2mf-9vhc-3ptw-a8ke-rn5d", **FAST)


def test_verifier_shape(verifier: password.Verifier) -> None:
    assert set(verifier) == {"alg", "n", "r", "p", "salt", "hash"}
    assert verifier["alg"] == "scrypt"
    assert (verifier["n"], verifier["r"], verifier["p"]) == (password.default_n(), 8, 1)
    assert len(base64.b64decode(verifier["salt"])) == 16
    assert len(base64.b64decode(verifier["hash"])) == 32
    json.dumps(verifier)  # JSON-able as it is


def test_check_password(verifier: password.Verifier) -> None:
    assert check_password(verifier, "kd7q-x2mf-9vhc-3ptw-a8ke-rn5d")
    assert not check_password(verifier, "kd7q-x2mf-9vhc-3ptw-a8ke-rn5e")
    assert not check_password(verifier, "")
    assert not check_password(verifier, "KD7Q-X2MF-9VHC-3PTW-A8KE-RN5D")


def test_default_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the tests' scrypt hook (conftest sets it for the suite) a verifier is made at
    full strength, N=2^15, and one below N=2^14 is refused wherever it is read."""
    monkeypatch.delenv(kdfhook.TEST_KDF_N_ENV, raising=False)
    v = make_verifier("s3cret")
    assert (v["n"], v["r"], v["p"]) == (2**15, 8, 1)
    assert check_password(v, "s3cret") and not check_password(v, "s3cret ")
    assert make_verifier("s3cret", **FAST)["n"] == 2**15
    assert password.least_n() == 2**14


def test_the_tests_scrypt_hook_makes_and_takes_weaker_verifiers_only_while_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Session 75 (CI time): under ``TLSROLL_TEST_KDF_N`` (the CA key's hook) a verifier is
    made with its N and taken down to it, by every reader (``validate_verifier``: the leader,
    the agent, the reference server) and by a workstation's hello (``KDF.from_json``). Unset,
    such a verifier and such a hello are refused, as any below 2^14 always were: a verifier a
    test made is never kept as a production one, and no node talks a workstation down."""
    monkeypatch.setenv(kdfhook.TEST_KDF_N_ENV, "256")
    weak = make_verifier("s3cret")
    assert weak["n"] == 256 and make_verifier("s3cret", **FAST)["n"] == 256
    assert password.least_n() == 256 and check_password(weak, "s3cret")
    text = verifier_to_json(weak)
    hello_kdf = {"alg": "scrypt", "n": 256, "r": 8, "p": 1, "salt": weak["salt"], "dklen": 32}
    assert proto.KDF.from_json(hello_kdf).n == 256
    with pytest.raises(ValueError, match=re.escape("from 2**8 to 2**20, got 128") + "$"):
        make_verifier("s3cret", n=128)  # (not below the hook's own N either)
    monkeypatch.setenv(kdfhook.TEST_KDF_N_ENV, "")  # empty: as unset
    with pytest.raises(ValueError, match=re.escape("from 2**14 to 2**20, got 256")) as refused:
        verifier_from_json(text)
    # (named: whoever left it set where the verifier was made sees why: review s75 revpwkdf)
    assert f"got 256 (as {kdfhook.TEST_KDF_N_ENV}, tests only, makes it)" in str(refused.value)
    with pytest.raises(ValueError, match=r"got 30000$"):
        make_verifier("s3cret", n=30000)  # (no power of 2: not one the hook makes)
    with pytest.raises(proto.BootstrapError, match="n=256"):
        proto.KDF.from_json(hello_kdf)
    # Set wrong: as unset here (full strength, never weaker); the leader, the agent, ``init``
    # and ``password set`` refuse to run with it.
    monkeypatch.setenv(kdfhook.TEST_KDF_N_ENV, "16384")
    assert password.default_n() == 2**15 and password.least_n() == 2**14
    assert (kdfhook.BELOW, kdfhook.BELOW) == (password.MIN_N, keywrap.SCRYPT_N)


def test_salt_is_random() -> None:
    a, b = make_verifier("same", **FAST), make_verifier("same", **FAST)
    assert a["salt"] != b["salt"] and a["hash"] != b["hash"]


def test_unicode_is_normalised() -> None:
    composed, decomposed = "Gr\u00fc\u00dfe", "Gru\u0308\u00dfe"
    v = make_verifier(composed, **FAST)
    assert check_password(v, decomposed)


def test_json_round_trip(verifier: password.Verifier) -> None:
    text = verifier_to_json(verifier)
    assert text.endswith("\n") and text.count("\n") == 1
    again = verifier_from_json(text)
    assert again == verifier
    assert verifier_from_json(text.encode()) == verifier
    assert check_password(again, "kd7q-x2mf-9vhc-3ptw-a8ke-rn5d")


def _with(verifier: password.Verifier, **changes: Any) -> str:
    data: dict[str, Any] = {**verifier, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not None})


BAD_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("missing-hash", {"hash": None}, "lacks field(s): hash"),
    ("missing-salt", {"salt": None}, "lacks field(s): salt"),
    ("unknown", {"pepper": "x"}, "unknown field(s): pepper"),
    ("alg", {"alg": "md5"}, "alg must be 'scrypt'"),
    ("n-not-power", {"n": 30000}, "power of two"),
    ("n-too-small", {"n": 1}, "power of two"),  # (2**10 passes the tests' scrypt hook)
    ("n-too-big", {"n": 2**24}, "power of two"),
    ("n-bool", {"n": True}, "n must be an integer"),
    ("n-string", {"n": "16384"}, "n must be an integer"),
    ("r-zero", {"r": 0}, "scrypt r must be"),
    ("p-big", {"p": 99}, "scrypt p must be"),
    ("salt-b64", {"salt": "not base64!"}, "salt is not valid base64"),
    ("salt-short", {"salt": base64.b64encode(b"short").decode()}, "salt must be at least 16"),
    ("salt-type", {"salt": 5}, "salt must be a base64 string"),
    ("hash-short", {"hash": base64.b64encode(b"x").decode()}, "hash must be 16 to 64"),
]


@pytest.mark.parametrize(
    ("changes", "message"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_bad_verifiers_raise_one_line(
    verifier: password.Verifier, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        verifier_from_json(_with(verifier, **changes))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["", "{", "[1]", "null", '"x"', b"\xff"])
def test_not_a_json_object(text: str | bytes) -> None:
    with pytest.raises(ValueError) as info:
        verifier_from_json(text)
    assert "\n" not in str(info.value)


def test_check_password_rejects_a_broken_verifier(verifier: password.Verifier) -> None:
    broken = dict(verifier)
    del broken["salt"]
    with pytest.raises(ValueError, match="lacks"):
        check_password(broken, "x")
    with pytest.raises(ValueError, match="lacks"):
        verifier_to_json(broken)


def test_make_verifier_checks_its_input() -> None:
    with pytest.raises(ValueError):
        make_verifier("")
    with pytest.raises(ValueError, match="power of two"):
        make_verifier("x", n=1000)


def test_generated_passwords() -> None:
    seen = {generate_password() for _ in range(200)}
    assert len(seen) == 200
    group = f"[{password.ALPHABET}]{{4}}"
    for pw in seen:
        assert re.fullmatch(rf"{group}(-{group}){{5}}", pw), pw
    # None of the worst look-alikes (0/o, 1/l/i); others remain (the ALPHABET comment).
    assert not set("01ilo") & set(password.ALPHABET)
    assert len(set(password.ALPHABET)) == len(password.ALPHABET) == 31
    # Every symbol shows up: the draw is over the whole alphabet.
    assert set("".join(seen).replace("-", "")) == set(password.ALPHABET)


def test_entropy_is_at_least_100_bits() -> None:
    chars = password.GROUPS * password.GROUP_LEN
    assert abs(password.ENTROPY_BITS - chars * math.log2(31)) < 1e-9
    assert password.ENTROPY_BITS >= 100
    assert len(generate_password().replace("-", "")) == chars


# --- the password file ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"s3cret", "s3cret"),
        (b"s3cret\n", "s3cret"),
        (b"s3cret\r\n", "s3cret"),
        (b"with inner spaces\n", "with inner spaces"),
        ("Grüße-日本\n".encode(), "Grüße-日本"),
        (b"\xef\xbb\xbfs3cret\r\n", "s3cret"),  # Notepad's "UTF-8 with BOM"
    ],
    ids=["no-line-end", "lf", "crlf", "inner-spaces-kept", "utf-8", "one-bom-dropped"],
)
def test_password_file_is_its_only_line(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "pw"
    path.touch(0o600)  # (a file group or others can access is refused first)
    path.write_bytes(content)
    assert read_password_file(path) == expected


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (b"\n", "is empty"),
        (b"\r\n", "is empty"),
        (b"  \t \n", "is empty (white space only)"),
        (b"s3cret\nsecond\n", "has more than one line"),
        (b"s3cret\n\n", "has more than one line"),
        (b"s3cret\r\n\r\n", "has more than one line"),
        (b"\ns3cret", "has more than one line"),
        (b"s3c\rret", "has more than one line"),
        (b"s3cret\r", "has more than one line"),
        (b"s3cr\xe9t\n", "is not UTF-8 text"),
        (b"s3cret \n", "starts or ends with white space"),
        (b" s3cret\n", "starts or ends with white space"),
        ("s3cret\u00a0\n".encode(), "starts or ends with white space"),
        (b"s3cret\t\n", "starts or ends with white space"),
        (b"s3c\tret\n", "has an invisible or control character (U+0009) at position 4"),
        (b"s3c\x00ret\n", "has an invisible or control character (U+0000) at position 4"),
        (b"s3c\x1bret\n", "has an invisible or control character (U+001B) at position 4"),
        ("s3c\u200bret".encode(), "has an invisible or control character (U+200B) at position 4"),
        ("s3c\u202eret".encode(), "has an invisible or control character (U+202E) at position 4"),
        ("s3c\u2028ret".encode(), "has an invisible or control character (U+2028) at position 4"),
        ("s3c\u2029ret".encode(), "has an invisible or control character (U+2029) at position 4"),
        (
            "\ufeff\ufeffs3cret".encode(),
            "has an invisible or control character (U+FEFF) at position 1",
        ),
        ("s3cret\ufeff".encode(), "has an invisible or control character (U+FEFF) at position 7"),
    ],
    ids=[
        "empty",
        "lf-only",
        "crlf-only",
        "blank",
        "two-lines",
        "blank-second-line",
        "two-crlf",
        "leading-line-end",
        "inner-cr",
        "trailing-lone-cr",
        "latin-1",
        "trailing-space",
        "leading-space",
        "trailing-nbsp",
        "trailing-tab",
        "inner-tab",
        "nul",
        "esc",
        "zero-width-space",
        "bidi-override",
        "line-separator",
        "paragraph-separator",
        "second-bom",
        "bom-at-the-end",
    ],
)
def test_password_file_refused(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "pw"
    path.touch(0o600)
    path.write_bytes(content)
    with pytest.raises(PasswordFileError) as info:
        read_password_file(path)
    assert isinstance(info.value, TlsrollError)
    assert str(info.value).startswith(f"{path} {problem}")
    assert "\n" not in str(info.value) and "s3c" not in str(info.value)


def test_a_typed_password_that_is_no_text_is_refused_by_the_rule() -> None:
    """Review s66 pw L1: a byte typed that is not UTF-8, read off a terminal with
    ``surrogateescape`` (a lone surrogate: Cs), passed the rule and failed in the hash
    (UnicodeEncodeError: "internal error"). The rule refuses it, and says nothing of it."""
    assert password.password_problem("s3cr\udce9t-with-more-words") == (
        "is not UTF-8 text (a terminal set to another encoding, such as Latin-1?)"
    )
    assert not password.is_utf8("\ud800") and password.is_utf8("s3crét")
    assert password.password_problem("s3crét-with-more-words") is None


def test_password_file_unreadable(tmp_path: Path) -> None:
    with pytest.raises(PasswordFileError, match=re.escape("No such file or directory")):
        read_password_file(tmp_path / "missing")
    with pytest.raises(PasswordFileError, match="cannot read"):
        read_password_file(tmp_path)  # a directory
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked"
        locked.write_text("s3cret\n")
        locked.chmod(0)
        with pytest.raises(PasswordFileError, match=re.escape(f"cannot read {locked}: ")):
            read_password_file(locked)


@pytest.mark.parametrize(
    "args",
    [
        ["password", "set"],
        ["client", "test-connection", "https://127.0.0.1:1/x/"],
    ],
    ids=["password-set", "client"],
)
def test_both_clis_refuse_a_two_line_password_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    """Same file, same rule, same exit code, before anything is contacted (the socket and the
    URL lead nowhere: reaching them would be another error)."""
    path = tmp_path / "pw"
    path.touch(0o600)  # (the admin CLI refuses a file others can read first)
    path.write_text("s3cret\nsecond\n")
    socket = tmp_path / "no-leader.sock"
    code = cli.main(["--socket", str(socket), *args, "--password-file", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("tlsroll: error: ")
    assert "--password-file" in err and f"{path} has more than one line" in err


@pytest.mark.parametrize(
    "args",
    [
        ["password", "set"],
        ["rollout", "start", "--scope", "cluster", "--yes"],
        ["client", "test-connection", "https://127.0.0.1:1/x/"],
    ],
    ids=["password-set", "rollout-start", "client"],
)
@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("\ufeffZebra-Quartz-Mango-7741 \r\n", "starts or ends with white space"),
        ("Zebra-Quartz\tMango-7741\n", "invisible or control character (U+0009) at position 13"),
    ],
    ids=["bom-and-trailing-space", "tab"],
)
def test_every_cli_refuses_a_password_nobody_can_type(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    content: str,
    says: str,
) -> None:
    """Audit s34 H4: such a file was staged as is, and no workstation could type it. The admin
    CLI (both commands) and the workstation read by one rule: exit 2 and one line that says
    where and never shows the password, before anything is contacted."""
    path = tmp_path / "pw"
    path.touch(0o600)
    path.write_bytes(content.encode())
    socket = tmp_path / "no-leader.sock"
    code = cli.main(["--socket", str(socket), *args, "--password-file", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("tlsroll: error: ")
    assert "--password-file" in err and says in err
    assert "Zebra" not in err and "Mango" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["password", "set"],
        ["rollout", "start", "--scope", "cluster", "--yes"],
        ["notify", "--include-password"],
    ],
    ids=["password-set", "rollout-start", "notify"],
)
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620], ids=lambda m: f"{m:04o}")
def test_the_admin_cli_refuses_a_password_file_others_can_access(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], mode: int
) -> None:
    """Audit s38 L2: a password file group or others could read (0644) was staged silently.
    The admin CLI says so as it does of the leader's and the agents' secret files
    (``tlsroll.fsutil.check_private_file``): exit 2, one line, before anything is contacted
    (the socket leads nowhere), never the password."""
    path = tmp_path / "pw"
    path.write_text("Zebra-Quartz-Mango-7741\n")
    path.chmod(mode)
    socket = tmp_path / "no-leader.sock"
    code = cli.main(["--socket", str(socket), *args, "--password-file", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("tlsroll: error: ")
    assert f"{path} is accessible by others (mode {mode:04o}); run: chmod 600 {path}" in err
    assert "--password-file" in err and "Zebra" not in err
    path.chmod(0o600)  # the same file, private: the leader is what is missing now
    code = cli.main(["--socket", str(socket), *args, "--password-file", str(path)])
    err = capsys.readouterr().err
    assert code == 1 and "accessible" not in err, err


def test_a_password_file_others_can_access_is_named_as_the_file_it_is(tmp_path: Path) -> None:
    """Review s38ntf2 L5: the mode is that of the file read (one open, ``fstat``), and the
    message names that file: `--password-file /dev/stdin < pw` said "chmod 600 /dev/stdin",
    which changes nothing; a link is named with the file it leads to."""
    path = tmp_path / "pw"
    path.write_text("Zebra-Quartz-Mango-7741\n")
    path.chmod(0o644)
    link = tmp_path / "link"
    link.symlink_to(path)
    socket = str(tmp_path / "no-leader.sock")
    base = [sys.executable, "-m", "tlsroll", "--socket", socket, "password", "set"]
    with path.open("rb") as stdin:
        piped = subprocess.run(
            [*base, "--password-file", "/dev/stdin"],
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    linked = subprocess.run(
        [*base, "--password-file", str(link)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    for result, given in ((piped, "/dev/stdin"), (linked, str(link))):
        assert result.returncode == 2, result.stderr
        line = result.stderr.strip()
        assert "\n" not in line and "Traceback" not in result.stderr and "Zebra" not in line
        assert f"{given} ({path}) is accessible by others (mode 0644)" in line, line
        assert f"run: chmod 600 {path} " in line, line


def test_a_staged_password_says_the_change_password_rollout_applies_it() -> None:
    """Audit s38 M3: `schema show`, the viewer (both languages) and the schema said a staged
    password "takes effect at next restart"; a rotate-cert restarts the server and keeps the
    live one (leader.changes.RotateCert). What applies it is a change-password rollout."""
    from leader.cli import draw
    from leader.viewer.i18n import TEXTS

    command = "`tlsroll rollout start --change change-password`"
    for text in (draw.PENDING, TEXTS["en"]["password_pending"], TEXTS["de"]["password_pending"]):
        assert command in text, text
        assert "next restart" not in text and "nach Neustart" not in text, text
    assert "which restarts the server" in draw.PENDING
    assert "startet den Server neu" in TEXTS["de"]["password_pending"]


# --- a generated password as people type it (review s69 revpass L2) ----------------------------


@pytest.mark.parametrize(
    "typed",
    [
        "kd7q-x2mf-9vhc-3ptw-a8ke-rn5d",
        "KD7Q-X2MF-9VHC-3PTW-A8KE-RN5D",  # Caps Lock
        "Kd7q-X2mf-9vhc-3ptw-A8ke-rn5d",
        "kd7q x2mf 9vhc 3ptw a8ke rn5d",  # spaces for hyphens
        "kd7qx2mf9vhc3ptwa8kern5d",  # no separators
        " kd7q - x2mf-9vhc-3ptw-a8ke-rn5d ",
        "kd7qx-2mf9vhc3ptw-a8kern5d",  # hyphens elsewhere
    ],
)
def test_a_generated_password_typed_otherwise_is_folded_to_its_form(typed: str) -> None:
    assert password.folded(typed) == "kd7q-x2mf-9vhc-3ptw-a8ke-rn5d"
    assert password.generated_form(typed) == "kd7q-x2mf-9vhc-3ptw-a8ke-rn5d"


@pytest.mark.parametrize(
    "typed",
    [
        "kd7q-x2mf-9vhc-3ptw-a8ke-rn5",  # 23 characters
        "kd7q-x2mf-9vhc-3ptw-a8ke-rn5dd",  # 25
        "kd7q-x2mf-9vhc-3ptw-a8ke-rn5o",  # o is not in the alphabet
        "kd7q-x2mf-9vhc-3ptw-a8ke-rn51",
        "kd7q_x2mf_9vhc_3ptw_a8ke_rn5d",  # another separator: as it is
        "kd7q-x2mf-9vhc-3ptw-a8ke-rn5\u212a",  # the Kelvin sign lowers to k: not folded
        "first-password-kd7q-x2mf",
        "correct horse battery staple",
    ],
)
def test_anything_else_is_left_as_it_is(typed: str) -> None:
    assert password.folded(typed) == typed
    assert password.generated_form(typed) is None


def test_a_chosen_password_of_the_generated_shape_must_be_in_its_form() -> None:
    """Folding can never make a right password wrong: `password set` takes one of the shape
    only as folding leaves it."""
    assert password.unfolded_problem("kd7q-x2mf-9vhc-3ptw-a8ke-rn5d") is None
    assert password.unfolded_problem("correct horse battery staple") is None
    assert password.unfolded_problem(generate_password()) is None
    for written in ("KD7Q-X2MF-9VHC-3PTW-A8KE-RN5D", "kd7qx2mf9vhc3ptwa8kern5d"):
        why = password.unfolded_problem(written)
        assert why is not None and "shape of a generated password" in why
        assert written not in why and written.lower() not in why


def test_the_agent_says_the_scrypt_hook_and_refuses_it_wrong_or_for_its_installed_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 75: an agent under ``TLSROLL_TEST_KDF_N`` takes password verifiers that weak:
    it says so at every start (warning, hint), and refuses to start (a config error, exit 2)
    with it set wrong or for the installed agent's data dir, where a production verifier
    lives; unset, nothing is said."""
    import structlog.testing

    from nodeagent import runtime
    from tlsroll.defaults import AGENT_DATA_DIR
    from tlsroll.errors import ConfigError

    def hook(data_dir: Path) -> list[Any]:
        with structlog.testing.capture_logs() as logs:
            runtime._kdf_hook(cast("AgentConfig", SimpleNamespace(data_dir=data_dir)))
        return [e for e in logs if e["event"] == "agent.test_hook"]

    monkeypatch.setenv(kdfhook.TEST_KDF_N_ENV, "256")
    (said,) = hook(tmp_path)
    assert (said["hook"], said["value"], said["log_level"]) == (
        kdfhook.TEST_KDF_N_ENV,
        256,
        "warning",
    )
    assert "N=256" in said["detail"] and kdfhook.TEST_KDF_N_ENV in said["hint"]
    with pytest.raises(ConfigError, match="installed agent's data directory"):
        hook(AGENT_DATA_DIR)
    for wrong in ("16384", "1000", "x"):
        monkeypatch.setenv(kdfhook.TEST_KDF_N_ENV, wrong)
        with pytest.raises(ConfigError, match=re.escape("must be a power of 2 from 2 to 8192")):
            hook(tmp_path)
    monkeypatch.delenv(kdfhook.TEST_KDF_N_ENV)
    assert hook(AGENT_DATA_DIR) == []  # unset: the installed dir is fine, nothing said


def test_password_set_says_the_scrypt_hook_and_refuses_it_set_wrong(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Session 75: ``tlsroll password set`` under ``TLSROLL_TEST_KDF_N`` makes the verifier
    with its N and says so (stderr, once staged); set wrong, a usage error before anything is
    read or asked. (A leader without the hook refuses such a verifier: ``least_n``.)"""
    import click

    from leader.cli import password as password_cmd

    monkeypatch.setenv(kdfhook.TEST_KDF_N_ENV, "256")
    said = password_cmd.kdf_hook()
    assert said is not None and "scrypt N=256, not N=32768" in said and "\n" not in said
    assert json.loads(password_cmd.verifier_json("s3cret"))["n"] == 256
    monkeypatch.setenv(kdfhook.TEST_KDF_N_ENV, "3")
    with pytest.raises(click.UsageError, match="must be a power of 2"):
        password_cmd.kdf_hook()
    monkeypatch.delenv(kdfhook.TEST_KDF_N_ENV)
    assert password_cmd.kdf_hook() is None
    assert json.loads(password_cmd.verifier_json("s3cret"))["n"] == 2**15
