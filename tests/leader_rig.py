"""The Leader gRPC service in this process (not the daemon) on a real mutual-TLS port, with a
real store file and one node enrolled, for tests that look inside it while heartbeats arrive
(the statements it runs, the threads it uses, what it parses)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import grpc

from leader.service import LeaderService, LeaderState
from leader.store import NodeCert, Store
from tlsroll import pki, spiffe
from tlsroll.defaults import AGENT_PORT, CONTROL_PORT
from tlsroll.v1 import leader_pb2_grpc


@dataclass
class InProcessLeader:
    server: grpc.aio.Server  # not started: a test may patch what the service calls first
    store: Store
    state: LeaderState
    clock: list[dt.datetime]  # the leader's clock; a test moves clock[0]
    target: str  # host:port of the control port
    node: grpc.ChannelCredentials  # the enrolled node's client credentials
    service: LeaderService
    node_files: tuple[bytes, bytes, bytes]  # the node's key, certificate and the CA (PEM)

    async def close(self) -> None:
        """Stop the service (at once) and close the store."""
        await self.server.stop(None)
        self.store.close()


def leader_with_a_node(
    tmp_path: Path, address: str, node_address: str, name: str = "hb1"
) -> InProcessLeader:
    """A CA, the leader's certificate for ``address``, node ``name`` enrolled on
    ``node_address`` with a certificate of that CA, and the service on ``address``'s control
    port requiring client certificates of the CA."""
    ca = pki.CertificateAuthority.create()
    td = ca.trust_domain
    leader_key = pki.generate_key()
    leader_cert = ca.issue(
        leader_key.public_key(),
        pki.Names.of("tlsroll-leader", [address], [spiffe.leader_host(td)]),
        server=True,
        client=True,
        identity=spiffe.leader(td),
    )
    node_key = pki.generate_key()
    node_cert = ca.issue(
        node_key.public_key(),
        pki.Names.of(name, [node_address]),
        server=True,
        client=True,
        identity=spiffe.node(td, name),
    )
    clock = [dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)]
    store = Store(tmp_path / "leader.sqlite3")
    store.add_token(
        "t00001", "s" * 26, ttl=dt.timedelta(hours=1), uses=1, description="", now=clock[0],
        actor="test", node_name=name, addresses=(node_address,),
    )  # fmt: skip
    store.enrol(
        token_id="t00001", secret="s" * 26, name=name, addresses=(node_address,), dns_names=(),
        agent_version="1", agent_port=AGENT_PORT, key_pin=pki.spki_pin(node_cert), now=clock[0],
        issue=lambda: NodeCert(
            pki.spki_pin(node_cert), pki.fingerprint(node_cert),
            f"{node_cert.serial_number:x}", node_cert.not_valid_after_utc,
        ),
    )  # fmt: skip
    state = LeaderState(store=store, ca=ca, clock=lambda: clock[0], heartbeat_interval=5)
    server = grpc.aio.server()
    service = LeaderService(state)
    leader_pb2_grpc.add_LeaderServicer_to_server(service, server)
    target = f"{address}:{CONTROL_PORT}"
    server.add_secure_port(
        target,
        grpc.ssl_server_credentials(
            [(pki.key_to_pem(leader_key), pki.cert_to_pem(leader_cert))],
            root_certificates=ca.cert_pem,
            require_client_auth=True,
        ),
    )
    node = grpc.ssl_channel_credentials(
        ca.cert_pem, pki.key_to_pem(node_key), pki.cert_to_pem(node_cert)
    )
    files = (pki.key_to_pem(node_key), pki.cert_to_pem(node_cert), ca.cert_pem)
    return InProcessLeader(server, store, state, clock, target, node, service, files)
