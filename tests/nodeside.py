"""Harness for the node side of the switch: a cluster with one agent managing a reference
server, and a stand-in for the leader that drives the agent's steps directly over mTLS."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from tests.cluster import Agent, Cluster, secure_channel, wait_until
from tests.refserver_helper import RefServer
from tlsroll import pki
from tlsroll.defaults import HTTP_PORT, HTTPS_PORT
from tlsroll.v1 import agent_pb2, agent_pb2_grpc


class Node:
    """One node: a reference server (the managed server) and the agent that manages it."""

    def __init__(self, cluster: Cluster, name: str, address: str, root: Path) -> None:
        self.cluster = cluster
        self.name = name
        self.address = address
        self.server = RefServer(root / "server", address)
        self.agent: Agent | None = None
        self.epoch = 1

    def start(self, env: dict[str, str] | None = None, **server: object) -> Node:
        self.server.start()
        self.agent = self.cluster.add_agent(
            self.name,
            self.address,
            extra_config={
                "server": {"driver": "reference", "config_file": self.server.config_path, **server}
            },
            env=env,
        )
        return self

    # --- the leader's side of the calls -------------------------------------------------------

    @contextlib.contextmanager
    def stub(self) -> Iterator[agent_pb2_grpc.NodeAgentStub]:
        assert self.agent is not None
        cert, key = self.cluster.leader_credentials()
        with secure_channel(self.agent.target, self.cluster.ca_pem, cert, key) as channel:
            yield agent_pb2_grpc.NodeAgentStub(channel)

    def command(self, rollout_id: str, epoch: int | None = None) -> agent_pb2.Command:
        return agent_pb2.Command(rollout_id=rollout_id, epoch=epoch or self.epoch)

    def ca(self) -> pki.CertificateAuthority:
        passphrase = self.cluster.passphrase_path.read_bytes().strip()
        return pki.CertificateAuthority.load(
            self.cluster.ca_cert_path, self.cluster.ca_key_path, passphrase
        )

    def stage(self, rollout_id: str) -> agent_pb2.StageResponse:
        """CreateCSR, sign with the cluster CA as the leader would, Stage."""
        with self.stub() as stub:
            csr_pem = stub.CreateCSR(
                agent_pb2.CreateCSRRequest(command=self.command(rollout_id)), timeout=10
            ).csr_pem
            ca = self.ca()
            csr = pki.load_csr_pem(csr_pem)
            cert = ca.sign_csr(csr, pki.names_of(csr), server=True, client=False)
            return stub.Stage(
                agent_pb2.StageRequest(
                    command=self.command(rollout_id),
                    certificate_pem=pki.cert_to_pem(cert),
                    ca_certificate_pem=ca.cert_pem,
                ),
                timeout=10,
            )

    def switch(self, rollout_id: str) -> agent_pb2.Transaction:
        with self.stub() as stub:
            return stub.Switch(
                agent_pb2.SwitchRequest(command=self.command(rollout_id), change="enable-tls"),
                timeout=10,
            )

    def rollback(self, rollout_id: str) -> agent_pb2.Transaction:
        with self.stub() as stub:
            return stub.Rollback(
                agent_pb2.RollbackRequest(command=self.command(rollout_id)), timeout=10
            )

    def txn(self, rollout_id: str, kind: str = "switch") -> agent_pb2.Transaction:
        with self.stub() as stub:
            return stub.GetTransaction(
                agent_pb2.GetTransactionRequest(rollout_id=rollout_id, kind=kind), timeout=10
            )

    def wait_txn(self, rollout_id: str, kind: str = "switch", timeout: float = 60) -> Any:
        result: list[agent_pb2.Transaction] = []

        def finished() -> bool:
            try:
                t = self.txn(rollout_id, kind)
            except grpc.RpcError:
                return False
            result[:] = [t]
            return bool(t.outcome)

        wait_until(finished, timeout, f"{kind} of {rollout_id} on {self.name} to finish")
        return result[0]

    # --- what a client sees ------------------------------------------------------------------

    def http_url(self) -> str:
        return f"http://{self.address}:{HTTP_PORT}{self.server.app_path}"

    def https_url(self) -> str:
        return f"https://{self.address}:{HTTPS_PORT}{self.server.app_path}"

    def server_pid(self) -> int | None:
        try:
            return int((self.server.data_dir / "refserver.pid").read_text())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        """Stop the managed server too when the agent's driver restarted it (not our child)."""
        pid = self.server_pid()
        self.server.close()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
