"""Bad input in the daemons' configs, their start-up and the admin API (review s47rtin L3,
L4, L7, L9): one line naming the real cause, the config exit code 2 where a person must fix a
file, INVALID_ARGUMENT where the CLI's bounds are missed, nothing changed on a refusal. The
daemons and the CLI run as processes; the admin API is called over the leader's real socket."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.cluster import Cluster
from tests.conftest import next_loopback
from tests.nodeside import Node
from tlsroll import password
from tlsroll.v1 import admin_pb2, types_pb2

STATE_TABLES = ("rollouts", "rollout_nodes", "audit", "auth_versions", "meta")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """After ``tlsroll init``; its leader stopped unless a test starts it (and stops it)."""
    with Cluster(tmp_path_factory.mktemp("bad-config"), next_loopback()) as c:
        c.init()
        yield c


def _invalid(call: object, request: object) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=30)  # type: ignore[operator]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return err.value.details() or ""


# --- L7: the admin API bounds what the CLI bounds ----------------------------------------------


def _rollout(**fields: object) -> admin_pb2.RolloutRequest:
    return admin_pb2.RolloutRequest(
        change=types_pb2.CHANGE_ENABLE_TLS,
        scope=types_pb2.SCOPE_KIND_CLUSTER,
        freeze=types_pb2.FREEZE_MODE_NODE,
        **fields,  # type: ignore[arg-type]
    )


def test_the_admin_api_refuses_what_the_cli_bounds_and_records_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_leader()
    # A node with its agent and server, so that a request within the bounds is planned.
    node = Node(cluster, "n1", next_loopback(), tmp_path / "n1")
    try:
        node.start()
        with cluster.admin() as admin:
            # A password staged, for CheckPassword's parameters (audited: before is after this).
            verifier = password.make_verifier("kd7q-x2mf-9vhc-3ptw-a8ke-rn5d")
            admin.SetPassword(
                admin_pb2.SetPasswordRequest(
                    auth_verifier_json=password.verifier_to_json(verifier)
                ),
                timeout=30,
            )
            before = cluster.store_rows(STATE_TABLES)
            assert admin.PlanRollout(_rollout(failure_budget=200), timeout=30).rollout.nodes
            for call in (admin.PlanRollout, admin.StartRollout):
                for budget in (201, 2**32 - 1):
                    details = _invalid(call, _rollout(failure_budget=budget))
                    assert "failure-budget must be 0..200" in details
                cert_dir = admin_pb2.CertDir(ca_pem=b"")
                cert_dir.nodes.add(node="n1", key_file_mode=2**32 - 1)
                details = _invalid(call, _rollout(cert_dir=cert_dir))
                assert "key_file_mode 37777777777 is not a file mode" in details
            params = admin.CheckPassword(admin_pb2.CheckPasswordRequest(), timeout=30)
            # Malformed hashes, more of them than the throttle lets pass free (5): refused as
            # such, neither audited nor counted as wrong passwords.
            for size in (1, params.dklen - 1, params.dklen + 1, 3 * 1024 * 1024, 1, 1, 1):
                details = _invalid(
                    admin.CheckPassword,
                    admin_pb2.CheckPasswordRequest(
                        candidate_hash=b"x" * size, version=params.version
                    ),
                )
                assert f"candidate_hash must be {params.dklen} bytes (dklen), got {size}" in (
                    details
                )
            assert cluster.store_rows(STATE_TABLES) == before
            # A hash of the right length is checked as before (not throttled: nothing counted).
            right = password.derive_hash(
                "kd7q-x2mf-9vhc-3ptw-a8ke-rn5d",
                salt=params.salt,
                n=params.n,
                r=params.r,
                p=params.p,
                dklen=params.dklen,
            )
            wrong = admin.CheckPassword(
                admin_pb2.CheckPasswordRequest(
                    candidate_hash=bytes(params.dklen), version=params.version
                ),
                timeout=30,
            )
            assert not wrong.matches
            good = admin.CheckPassword(
                admin_pb2.CheckPasswordRequest(candidate_hash=right, version=params.version),
                timeout=30,
            )
            assert good.matches
            assert base64.b64decode(params.salt)  # the parameters came back whole
    finally:
        node.close()
        cluster.stop_leader()
    audit = [row for row in cluster.store_table("audit") if row["kind"] == "password.checked"]
    assert len(audit) == 2, audit  # the two well-formed checks only
