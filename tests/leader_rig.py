"""The Leader gRPC service in this process (not the daemon) on a real mutual-TLS port, with a
real store file and one node enrolled, for tests that look inside it while heartbeats arrive
(the statements it runs, the threads it uses, what it parses)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

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
    leader_files: tuple[bytes, bytes] = (b"", b"")  # the leader's key and certificate (PEM)
    credentials: grpc.ServerCredentials | None = None  # the control port's (``restart``)

    def add_node(self, name: str, address: str) -> grpc.ChannelCredentials:
        """Enrol another node ``name`` on ``address``: its client credentials."""
        key, cert = _enrol(self.store, self.state.ca, name, address, self.clock[0])
        return grpc.ssl_channel_credentials(
            self.state.ca.cert_pem, pki.key_to_pem(key), pki.cert_to_pem(cert)
        )

    async def restart(self) -> None:
        """Stop the server (at once) if it runs, and serve the same service on the same port
        again from a new one (the leader's restart, its store and state kept)."""
        await self.server.stop(None)
        assert self.credentials is not None
        self.server = grpc.aio.server()
        leader_pb2_grpc.add_LeaderServicer_to_server(self.service, self.server)
        self.server.add_secure_port(self.target, self.credentials)
        await self.server.start()

    async def close(self) -> None:
        """Stop the service (at once) and close the store."""
        await self.server.stop(None)
        self.store.close()


def _enrol(
    store: Store, ca: pki.CertificateAuthority, name: str, address: str, now: dt.datetime
) -> tuple[pki.PrivateKey, x509.Certificate]:
    """Node ``name`` enrolled in ``store`` (through a token, as the join port does) with a
    certificate of ``ca`` as the join port issues it (the leader dials its key name): its key
    and certificate."""
    key = pki.generate_key()
    cert = ca.issue(
        key.public_key(),
        pki.Names.of(name, [address]),
        server=True,
        client=True,
        identity=spiffe.node(ca.trust_domain, name),
        internal_dns=[spiffe.key_host(ca.trust_domain, pki.spki_pin(key.public_key()))],
    )
    token = f"t{len(store.list_tokens()) + 1:05d}"
    store.add_token(
        token, "s" * 26, ttl=dt.timedelta(hours=1), uses=1, description="", now=now,
        actor="test", node_name=name, addresses=(address,),
    )  # fmt: skip
    store.enrol(
        token_id=token, secret="s" * 26, name=name, addresses=(address,), dns_names=(),
        agent_version="1", agent_port=AGENT_PORT, key_pin=pki.spki_pin(cert), now=now,
        issue=lambda: NodeCert(
            pki.spki_pin(cert), pki.fingerprint(cert),
            f"{cert.serial_number:x}", cert.not_valid_after_utc,
        ),
    )  # fmt: skip
    return key, cert


def leader_with_a_node(
    tmp_path: Path,
    address: str,
    node_address: str,
    name: str = "hb1",
    *,
    serial_name: bool = False,
) -> InProcessLeader:
    """A CA, the leader's certificate for ``address``, node ``name`` enrolled on
    ``node_address`` with a certificate of that CA, and the service on ``address``'s control
    port requiring client certificates of the CA. ``serial_name``: the certificate also names
    its serial (``spiffe.leader_serial_host``) and heartbeat answers announce it, as the
    leader daemon's do (``leader.layout``); else as an earlier release's."""
    ca = pki.CertificateAuthority.create()
    td = ca.trust_domain
    leader_key = pki.generate_key()
    serial = x509.random_serial_number()
    dns = [spiffe.leader_host(td)]
    if serial_name:
        dns.append(spiffe.leader_serial_host(td, serial))
    leader_cert = ca.issue(
        leader_key.public_key(),
        pki.Names.of("tlsroll-leader", [address], dns),
        server=True,
        client=True,
        identity=spiffe.leader(td),
        serial=serial,
    )
    clock = [dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)]
    store = Store(tmp_path / "leader.sqlite3")
    node_key, node_cert = _enrol(store, ca, name, node_address, clock[0])
    start = clock[0]

    def monotonic() -> float:  # moved on with ``clock``, as time passes
        return (clock[0] - start).total_seconds()

    state = LeaderState(
        store=store,
        ca=ca,
        clock=lambda: clock[0],
        heartbeat_interval=5,
        # A test moves ``clock`` on as time passes: the monotonic clock with it (a test of a
        # step of the clock sets ``state.monotonic`` apart).
        monotonic=monotonic,
    )
    if serial_name:
        state.leader_serial = f"{serial:x}"
    server = grpc.aio.server()
    service = LeaderService(state)
    leader_pb2_grpc.add_LeaderServicer_to_server(service, server)
    target = f"{address}:{CONTROL_PORT}"
    credentials = grpc.ssl_server_credentials(
        [(pki.key_to_pem(leader_key), pki.cert_to_pem(leader_cert))],
        root_certificates=ca.cert_pem,
        require_client_auth=True,
    )
    server.add_secure_port(target, credentials)
    node = grpc.ssl_channel_credentials(
        ca.cert_pem, pki.key_to_pem(node_key), pki.cert_to_pem(node_cert)
    )
    files = (pki.key_to_pem(node_key), pki.cert_to_pem(node_cert), ca.cert_pem)
    leader = (pki.key_to_pem(leader_key), pki.cert_to_pem(leader_cert))
    return InProcessLeader(
        server, store, state, clock, target, node, service, files, leader, credentials
    )
