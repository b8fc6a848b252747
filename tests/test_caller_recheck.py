"""A node's certificate is checked before a handler works (``_check_on_record``: the clear
error in the common case) and again inside the write's transaction: a revocation (``tlsroll
ca revoke``) or a removal (``tlsroll nodes remove``) that commits between the two is not
bypassed. The interleaving is made, not waited for: the check is patched to let the other
write commit right after it passed. The real service and store, in this process."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from leader import store as store_module
from leader.service import Caller
from leader.store import Store
from tests.cluster import csr_pem
from tests.leader_rig import InProcessLeader, leader_with_a_node
from tlsroll import bootstrap_protocol, pki
from tlsroll.enums import RETRY_AFTER_KEY
from tlsroll.v1 import leader_pb2, leader_pb2_grpc


def _then(rig: InProcessLeader, where: str, write: Callable[[Store, dt.datetime], object]) -> None:
    """Make ``write`` commit right after the handler's own check of the caller passed
    (``where`` "check") or right before the handler's write begins (``where`` "write":
    ``method``, the store's write)."""
    store = rig.store
    if where == "check":
        check = rig.service._check_on_record

        def check_then_write(caller: Caller, peer: str = "") -> None:
            check(caller, peer)
            write(store, rig.clock[0])

        rig.service._check_on_record = check_then_write  # type: ignore[method-assign]
        return
    for method in ("renew_node_certificate", "issue_workstation"):
        original = getattr(store, method)

        def write_then(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            write(store, rig.clock[0])
            return _original(*args, **kwargs)

        setattr(store, method, write_then)


def _revoke(store: Store, now: dt.datetime) -> None:
    store.revoke(store.get_node("hb1").cert_serial, reason="stolen", now=now, actor="admin")


def _remove(store: Store, now: dt.datetime) -> None:
    store.remove_node("hb1", now=now, actor="admin")


def _serials(store: Store) -> list[str]:
    return [c.serial for c in store.list_certificates()]


@pytest.mark.parametrize("where", ["check", "write"])
@pytest.mark.parametrize(
    ("meanwhile", "message"),
    [
        (
            _revoke,
            "the certificate of node 'hb1' is revoked; enrol it again with a new key, once"
            " removed (tlsroll nodes remove hb1)",
        ),
        (_remove, "'hb1' is not an enrolled node (removed?)"),
    ],
)
async def test_a_renewal_is_refused_if_the_certificate_was_revoked_or_the_node_removed_meanwhile(
    tmp_path: Path,
    loopback: Callable[[], str],
    meanwhile: Callable[[Store, dt.datetime], object],
    message: str,
    where: str,
) -> None:
    """The audit's H1: a node certificate revoked between the renewal's check and its write
    renewed itself into a fresh, unrevoked one (a stolen key kept a valid identity). Refused
    now as the early check refuses it, and nothing is recorded."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    _then(rig, where, meanwhile)
    address = str(pki.names_of(pki.load_cert_pem(rig.node_files[1])).ips[0])
    await rig.server.start()
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            request = leader_pb2.RenewNodeCertificateRequest(
                csr_pem=csr_pem(pki.generate_key(), "hb1", [address])
            )
            before = (rig.store.list_nodes(include_removed=True), _serials(rig.store))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.RenewNodeCertificate(request, timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert refused.value.details() == message
        # nothing but the other write: no new certificate, the node's row as it left it
        after = (rig.store.list_nodes(include_removed=True), _serials(rig.store))
        assert [n.cert_fingerprint for n in after[0]] == [n.cert_fingerprint for n in before[0]]
        assert after[1] == before[1]
    finally:
        await rig.close()


@pytest.mark.parametrize("where", ["check", "write"])
@pytest.mark.parametrize(
    ("meanwhile", "message"),
    [
        (
            _revoke,
            "the certificate of node 'hb1' is revoked; enrol it again with a new key, once"
            " removed (tlsroll nodes remove hb1)",
        ),
        (_remove, "'hb1' is not an enrolled node (removed?)"),
    ],
)
async def test_a_workstation_is_not_signed_for_a_node_revoked_or_removed_meanwhile(
    tmp_path: Path,
    loopback: Callable[[], str],
    meanwhile: Callable[[Store, dt.datetime], object],
    message: str,
    where: str,
) -> None:
    """The audit's H2: a node removed (or its certificate revoked) between the check of its
    call and the write got a valid workstation client certificate signed after its removal,
    which had promised every certificate issued for the node revoked."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    _then(rig, where, meanwhile)
    await rig.server.start()
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            csr = pki.make_csr(pki.generate_key(), bootstrap_protocol.workstation_names("ws-a"))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.SignWorkstationCertificate(
                    leader_pb2.SignWorkstationRequest(csr_pem=pki.csr_to_pem(csr)), timeout=10
                )
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert refused.value.details() == message
        assert rig.store.list_certificates("workstation") == []
    finally:
        await rig.close()


async def test_the_checks_made_again_let_a_good_caller_through(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """Nothing committed in between: the renewal and the workstation are signed as before."""
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    address = str(pki.names_of(pki.load_cert_pem(rig.node_files[1])).ips[0])
    await rig.server.start()
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)
            csr = pki.make_csr(pki.generate_key(), bootstrap_protocol.workstation_names("ws-a"))
            await stub.SignWorkstationCertificate(
                leader_pb2.SignWorkstationRequest(csr_pem=pki.csr_to_pem(csr)), timeout=10
            )
            await stub.RenewNodeCertificate(
                leader_pb2.RenewNodeCertificateRequest(
                    csr_pem=csr_pem(pki.generate_key(), "hb1", [address])
                ),
                timeout=10,
            )
        assert [c.subject for c in rig.store.list_certificates("workstation")] == ["ws-a"]
        assert rig.store.get_node("hb1").prev_cert_fingerprint != ""
    finally:
        await rig.close()


async def test_a_node_s_workstation_certificates_are_capped_per_hour(
    tmp_path: Path, loopback: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most ``WORKSTATION_CERTS_PER_HOUR`` workstation certificates per node and hour (here
    lowered to 2): the next is refused with one line, and nothing is signed for it."""
    monkeypatch.setattr(store_module, "WORKSTATION_CERTS_PER_HOUR", 2)
    rig = leader_with_a_node(tmp_path, loopback(), loopback())
    await rig.server.start()
    try:
        async with grpc.aio.secure_channel(rig.target, rig.node) as channel:
            stub = leader_pb2_grpc.LeaderStub(channel)

            async def sign(cn: str) -> None:
                names = bootstrap_protocol.workstation_names(cn)
                csr = pki.make_csr(pki.generate_key(), names)
                await stub.SignWorkstationCertificate(
                    leader_pb2.SignWorkstationRequest(csr_pem=pki.csr_to_pem(csr)), timeout=10
                )

            await sign("ws-a")
            await sign("ws-b")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await sign("ws-c")
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
        assert refused.value.details() == (
            "node 'hb1' asked for 2 workstation certificates in the last hour (at most 2: "
            "workstation_certs_per_hour in leader.toml)"
        )
        # When it signs again: the first one's hour over (review s64 M3).
        trailing = refused.value.trailing_metadata()
        assert isinstance(trailing, grpc.aio.Metadata), trailing
        retry = trailing.get_all(RETRY_AFTER_KEY)
        assert len(retry) == 1 and 0 < int(retry[0]) <= 3600, retry
        subjects = [c.subject for c in rig.store.list_certificates("workstation")]
        assert sorted(subjects) == ["ws-a", "ws-b"]
    finally:
        await rig.close()
