"""``make dist``: the release bundle, a tarball that installs tlsroll offline on a server.

    python deploy/dist.py [--out DIR] [--python-version 3.12 ...]

It holds ``install.sh`` with what it installs: the systemd units, the example agent config,
the README, the man pages and shell completion (``share/``, copied to /usr/share), and
``wheels/``, a wheelhouse with the tlsroll wheel, every dependency's wheel for this machine and
Python (at the versions installed in the environment running this, which ``make test`` ran
with) and pip's own (Debian's python3 has no ensurepip without python3-venv).
``--python-version`` adds binary wheels for another CPython (Ubuntu 24.04 has 3.12), fetched
with ``pip download``. ``BUNDLE`` says which Pythons and which machine the wheels are for;
install.sh refuses a mismatch before it changes anything.

Why a wheelhouse and not a .deb: Debian 12's packages are too old for tlsroll's dependencies
(grpcio 1.51, cryptography 38, protobuf 3.21), so a .deb would have to carry a virtualenv of
its own (dh-virtualenv) built per distribution release, and it would still not install on
Ubuntu without a second build. The wheelhouse installs on Debian 12 and Ubuntu 24.04 alike
from one script, needs no packaging toolchain, and is tested end to end in a throwaway root
(tests/test_deploy.py). What dpkg would give for free, install.sh does itself: it keeps a
checksum of every file it ships and never overwrites one the admin changed.

Building needs the index (PyPI) unless pip's cache has every wheel; installing never does.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        check=True,
        stdout=subprocess.DEVNULL,
    )


# tools/completions.py's layout -> where the shells look (install.sh copies share/ to /usr/share)
COMPLETIONS = {
    "bash/tlsroll": "bash-completion/completions/tlsroll",
    "zsh/_tlsroll": "zsh/vendor-completions/_tlsroll",
    "fish/tlsroll.fish": "fish/vendor_completions.d/tlsroll.fish",
}


def share_files(share: Path, scratch: Path) -> None:
    """Man pages and shell completion, made from the click commands, under ``share``."""
    tools = ROOT / "tools"
    subprocess.run(
        [sys.executable, str(tools / "manpages.py"), "--out", str(share / "man" / "man1")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        [sys.executable, str(tools / "completions.py"), "--out", str(scratch)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    for made, target in COMPLETIONS.items():
        (share / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(scratch / made, share / target)


def build(out: Path, python_versions: list[str]) -> Path:
    """Build the bundle into ``out``; returns the tarball's path."""
    machine = platform.machine()
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    versions = [here, *(v for v in python_versions if v != here)]
    with tempfile.TemporaryDirectory(prefix="tlsroll-dist-") as tmp:
        work = Path(tmp)
        wheels = work / "wheels"
        constraints = work / "constraints.txt"
        frozen = subprocess.run(
            [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        # Pins only: a constraint may not be a URL ("name @ file://…" from a local install).
        pins = [line for line in frozen.splitlines() if "==" in line and " @ " not in line]
        constraints.write_text("\n".join(pins) + "\n")
        pip("wheel", "--quiet", "-c", str(constraints), "--wheel-dir", str(wheels), str(ROOT))
        pip_version = importlib.metadata.version("pip")
        pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
            f"pip=={pip_version}")  # fmt: skip
        (tlsroll_wheel,) = wheels.glob("tlsroll-*.whl")
        version = tlsroll_wheel.name.split("-")[1]
        # pip takes a target's platform tags literally: name every manylinux a glibc 2.36
        # (Debian 12; Ubuntu 24.04 has 2.39) runs.
        platforms = [f"--platform=manylinux_2_{minor}_{machine}" for minor in range(5, 37)]
        for other in versions[1:]:
            pip("download", "--quiet", "--only-binary=:all:", "-c", str(constraints),
                "--python-version", other, *platforms, "-d", str(wheels),
                str(tlsroll_wheel))  # fmt: skip
        tags = " ".join("cp" + v.replace(".", "") for v in versions)

        name = f"tlsroll-{version}"
        bundle = work / name
        bundle.mkdir()
        shutil.move(str(wheels), bundle / "wheels")
        shutil.copy2(DEPLOY / "install.sh", bundle / "install.sh")
        (bundle / "install.sh").chmod(0o755)
        shutil.copytree(DEPLOY / "systemd", bundle / "systemd")
        shutil.copytree(DEPLOY / "examples", bundle / "examples")
        shutil.copy2(ROOT / "README.md", bundle / "README.md")
        # The docs the README and the daemons' messages name (docs/ca-renewal.md: what to do
        # for a CA key lost or stolen), installed beside it: a release carried the README only,
        # and a message sent the admin to a file no server had (review s66 walk L1).
        (bundle / "docs").mkdir()
        for doc in sorted((ROOT / "docs").glob("*.md")):
            shutil.copy2(doc, bundle / "docs" / doc.name)
        share_files(bundle / "share", work / "completions")
        (bundle / "BUNDLE").write_text(f"version={version}\npythons={tags}\nmachine={machine}\n")

        out.mkdir(parents=True, exist_ok=True)
        tarball = out / f"{name}-{'-'.join(tags.split())}-{machine}.tar.gz"
        with tarfile.open(tarball, "w:gz") as tar:
            tar.add(bundle, arcname=name)
    return tarball


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the tarball goes")
    parser.add_argument(
        "--python-version",
        action="append",
        default=[],
        metavar="X.Y",
        help="add wheels for another CPython (repeatable)",
    )
    args = parser.parse_args()
    print(build(args.out, args.python_version))


if __name__ == "__main__":
    main()
