"""Packaging basics: the licence file, one place for the version (and every ``--version`` and
the changelog agree with it), the man pages generated from the click commands, and the shell
completion files."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
from packaging.version import Version  # pytest's own dependency

from tests.cluster import child_env, command
from tlsroll import __version__
from tlsroll.cli import cli

ROOT = Path(__file__).resolve().parent.parent
# hatch's default pattern for a version in a source file (hatchling's "regex" version source)
HATCH_PATTERN = re.compile(r"""(?im)^(__version__|VERSION) *= *(['"])v?(?P<version>.+?)\2""")


def pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def test_license_is_the_apache_2_text_pyproject_names() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX" in text
    project = pyproject()["project"]
    assert isinstance(project, dict) and project["license"] == "Apache-2.0"


def test_the_version_is_written_once() -> None:
    data = pyproject()
    project, tool = data["project"], data["tool"]
    assert isinstance(project, dict) and isinstance(tool, dict)
    assert "version" not in project and "version" in project["dynamic"]
    assert tool["hatch"]["version"] == {"path": "tlsroll/__init__.py"}
    source = (ROOT / "tlsroll" / "__init__.py").read_text(encoding="utf-8")
    found = HATCH_PATTERN.findall(source)
    assert len(found) == 1, "hatch must find exactly one version in tlsroll/__init__.py"
    assert HATCH_PATTERN.search(source)["version"] == __version__  # type: ignore[index]
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", __version__), __version__


def test_the_changelog_names_the_version() -> None:
    """A release's version has its heading in the changelog, and nothing waits under
    *Unreleased*. Between releases (changes under *Unreleased*) the version is a development
    version after the newest release (``0.2.0.dev0`` after 0.1.0): a build since a release
    never says it is that release (agents report it, ``tlsroll nodes`` shows it, the bundle is
    named by it; upgrade audit s35 F6)."""
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert text.startswith("# Changelog\n")
    assert "## [Unreleased]" in text
    releases = re.findall(r"^## \[(\d[^\]]*)\] - \d{4}-\d{2}-\d{2}$", text, re.M)
    assert releases, "no release heading in CHANGELOG.md"
    newest = max(Version(r) for r in releases)
    unreleased = text.split("## [Unreleased]", 1)[1].split("\n## [", 1)[0]
    pending = [line for line in unreleased.splitlines() if line.startswith("- ")]
    version = Version(__version__)
    if pending:
        assert version.is_devrelease and version > newest, (
            f"__version__ {__version__} with changes under Unreleased: set the next version's "
            f".dev0 (after {newest}) in tlsroll/__init__.py"
        )
    else:
        assert version == newest, f"__version__ {__version__}: the newest release is {newest}"


@pytest.mark.parametrize(
    ("script", "module", "expected"),
    [
        ("tlsroll", "tlsroll", f"tlsroll, version {__version__}"),
        ("tlsroll-leader", "leader.daemon", f"tlsroll-leader {__version__}"),
        ("tlsroll-agent", "nodeagent.daemon", f"tlsroll-agent {__version__}"),
        ("tlsroll-refserver", "refserver.server", f"tlsroll-refserver {__version__}"),
    ],
)
def test_every_entry_point_prints_the_version(script: str, module: str, expected: str) -> None:
    result = subprocess.run(
        [*command(script, module), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


DAEMONS = ("tlsroll-leader", "tlsroll-agent", "tlsroll-refserver")


def every_command() -> list[str]:
    """``tlsroll ca show``, ``tlsroll rollout start``, …: every command path under the CLI."""
    paths: list[str] = []

    def walk(group: click.Command, ctx: click.Context) -> None:
        if not isinstance(group, click.Group):
            return
        for name in group.list_commands(ctx):
            sub = group.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            sub_ctx = click.Context(sub, info_name=name, parent=ctx)
            paths.append(sub_ctx.command_path)
            walk(sub, sub_ctx)

    walk(cli, click.Context(cli, info_name="tlsroll"))
    return paths


def esc(text: str) -> str:
    return text.replace("-", "\\-")


def run_tool(script: str, out: Path) -> list[Path]:
    """Run tools/SCRIPT --out OUT as ``make`` does; the files it says it wrote."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / script), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [Path(line) for line in result.stdout.split()]


def test_man_pages_name_every_command(tmp_path: Path) -> None:
    pages = {p.name: p.read_text(encoding="utf-8") for p in run_tool("manpages.py", tmp_path)}
    main = pages["tlsroll.1"]
    paths = every_command()
    assert {"tlsroll notify", "tlsroll rollout start", "tlsroll client test-connection"} <= set(
        paths
    )
    # Every exit code README "Exit codes" documents (review s45rt2 L5: only 2 and 1 were).
    status = main.split(".SH EXIT STATUS", 1)[1].split(".SH ", 1)[0]
    codes = re.findall(r"^\\fB(\d+)\\fR$", status, re.M)
    assert codes == ["0", "1", "2", "3", "4", "5", "6", "130"], status
    assert "INVALID_ARGUMENT" in status and "systemctl restart tlsroll\\-leader" in status
    # ... and says they are not test-connection's (review s45rev2 M1).
    assert "client test\\-connection" in status and "3 to 11" in status, status
    commands = main.split(".SH COMMANDS", 1)[1].split(".SH ", 1)[0]
    for path in paths:
        assert f"\\fB{esc(path)}\\fR" in commands, path
    tops = {p.split()[1] for p in paths}
    assert {f"tlsroll-{t}.1" for t in tops} | {"tlsroll.1"} | {f"{d}.1" for d in DAEMONS} == set(
        pages
    )
    notify = pages["tlsroll-notify.1"]
    for option in ("\\-\\-when", "\\-\\-duration", "\\-\\-timezone", "\\-\\-include\\-password"):
        assert option in notify, option
    rollout = pages["tlsroll-rollout.1"]
    assert '.SH "TLSROLL ROLLOUT START"' in rollout
    assert "\\fB\\-\\-config\\fR" not in pages["tlsroll-leader.1"]  # the --help text, .nf
    assert "\\-\\-config CONFIG" in pages["tlsroll-leader.1"]
    for name, text in pages.items():
        assert text.startswith(f'.TH "{esc(name[:-2].upper())}" "1" ""'), name
        assert f"tlsroll {__version__}" in text.splitlines()[0]
        for line in text.splitlines():  # a stray control line would swallow text
            assert not line.startswith("'"), (name, line)
            if line.startswith("."):
                assert re.match(r"\.(TH|SH|TP|PP|nf|fi)\b", line), (name, line)
    assert run_tool("manpages.py", tmp_path / "again") and all(  # no date: the same files again
        (tmp_path / "again" / n).read_text(encoding="utf-8") == t for n, t in pages.items()
    )


def test_completion_files_and_completion_itself(tmp_path: Path) -> None:
    paths = {p.relative_to(tmp_path).as_posix(): p for p in run_tool("completions.py", tmp_path)}
    assert set(paths) == {"bash/tlsroll", "zsh/_tlsroll", "fish/tlsroll.fish"}
    bash = paths["bash/tlsroll"].read_text(encoding="utf-8")
    assert "_TLSROLL_COMPLETE=bash_complete" in bash and "-F _tlsroll_completion tlsroll" in bash
    assert paths["zsh/_tlsroll"].read_text(encoding="utf-8").startswith("#compdef tlsroll")
    assert "_TLSROLL_COMPLETE=fish_complete" in paths["fish/tlsroll.fish"].read_text("utf-8")
    result = subprocess.run(
        command("tlsroll", "tlsroll"),
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(
            {
                "COMP_WORDS": "tlsroll notify --format ",
                "COMP_CWORD": "3",
                "_TLSROLL_COMPLETE": "bash_complete",
            }
        ),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["plain,text", "plain,markdown", "plain,html"]
