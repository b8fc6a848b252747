"""The gRPC contract: the committed generated code is what ``make proto`` makes, and the drift
check really notices a difference."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tlsroll.v1 import admin_pb2, agent_pb2, enrolment_pb2, leader_pb2

ROOT = Path(__file__).resolve().parent.parent


def run_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "tools" / "protogen.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        check=False,
    )


def drift_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("proto drift: ")]


def test_committed_code_equals_a_fresh_generation() -> None:
    result = run_check(ROOT)
    assert result.returncode == 0, result.stderr
    assert drift_lines(result) == []


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    """The proto sources, the generator and the generated package, copied as they are."""
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    shutil.copytree(
        ROOT / "tools", tmp_path / "tools", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(
        ROOT / "tlsroll" / "v1",
        tmp_path / "tlsroll" / "v1",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return tmp_path


def test_drift_check_fails_when_generated_code_differs(tree_copy: Path) -> None:
    out = tree_copy / "tlsroll" / "v1"
    assert run_check(tree_copy).returncode == 0  # the copy itself is clean
    with (out / "agent_pb2.py").open("a") as f:
        f.write("# edited by hand\n")
    (out / "leader_pb2.pyi").unlink()
    (out / "ghost_pb2.py").write_text("# no .proto makes this\n")
    result = run_check(tree_copy)
    assert result.returncode == 1
    lines = drift_lines(result)
    assert any("agent_pb2.py: differs" in line for line in lines), lines
    assert any("leader_pb2.pyi: missing" in line for line in lines), lines
    assert any("ghost_pb2.py: generated file with no .proto" in line for line in lines), lines
    assert len(lines) == 3


def test_drift_check_fails_when_a_proto_changes(tree_copy: Path) -> None:
    proto = tree_copy / "proto" / "tlsroll" / "v1" / "leader.proto"
    proto.write_text(proto.read_text() + "\nmessage Added {\n  string x = 1;\n}\n")
    result = run_check(tree_copy)
    assert result.returncode == 1
    assert {line.split(":")[1].strip() for line in drift_lines(result)} == {
        "tlsroll/v1/leader_pb2.py",
        "tlsroll/v1/leader_pb2.pyi",
    }


def test_contract_package_and_services() -> None:
    services = {
        name: module.DESCRIPTOR.services_by_name[name].full_name
        for module, name in [
            (enrolment_pb2, "Enrolment"),
            (leader_pb2, "Leader"),
            (admin_pb2, "Admin"),
            (agent_pb2, "NodeAgent"),
        ]
    }
    assert services == {
        "Enrolment": "tlsroll.v1.Enrolment",
        "Leader": "tlsroll.v1.Leader",
        "Admin": "tlsroll.v1.Admin",
        "NodeAgent": "tlsroll.v1.NodeAgent",
    }
    enrol = enrolment_pb2.DESCRIPTOR.services_by_name["Enrolment"].methods_by_name
    assert set(enrol) == {"Enrol"}
    assert "Heartbeat" in leader_pb2.DESCRIPTOR.services_by_name["Leader"].methods_by_name


def test_drift_check_fails_when_the_contract_revision_is_stale(tree_copy: Path) -> None:
    """Review rev51c H1: a proto change merged without ``tlsroll/contract.py``'s REVISION made
    every CLI call warn "other code" against a leader of the same build. The check says so,
    and `make proto` writes it."""
    for name in ("__init__.py", "contract.py"):
        shutil.copy(ROOT / "tlsroll" / name, tree_copy / "tlsroll" / name)
    assert run_check(tree_copy).returncode == 0
    contract = tree_copy / "tlsroll" / "contract.py"
    right = contract.read_text()
    contract.write_text(right.replace('REVISION = "', 'REVISION = "0', 1))
    result = run_check(tree_copy)
    assert result.returncode == 1
    [line] = drift_lines(result)
    assert line.startswith("proto drift: tlsroll/contract.py: REVISION '0"), line
