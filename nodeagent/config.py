"""The agent's configuration (TOML), e.g. ``/etc/tlsroll/agent.toml``::

[node]
name = "node1"
addresses = ["192.168.1.5"]      # every address clients use; all go into the certificate
dns_names = []

[leader]
address = "192.168.1.2"
ca_pin = "sha256:…"               # from `tlsroll ca show` on the leader
join_token_file = "/etc/tlsroll/join-token"   # or join_token = "…"; first start only

[agent]
data_dir = "/var/lib/tlsroll-agent"   # an absolute path
log_level = "info"                # debug | info | warning | error

An optional ``[server]`` table names the managed server's driver and its settings (see
``nodeagent.drivers.make_driver``). A key or table nothing reads is an error naming it: a typo
must not silently fall back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tlsroll import logs
from tlsroll.config import ConfigFile, Section
from tlsroll.defaults import (
    AGENT_PORT,
    BOOTSTRAP_PORT,
    CONTROL_PORT,
    HEARTBEAT_INTERVAL,
    JOIN_PORT,
)
from tlsroll.echo import shown
from tlsroll.names import Names, node_name_problem, parse_pin  # no X.509 (issue 15)


@dataclass(frozen=True)
class AgentConfig:
    path: Path
    node_name: str
    addresses: tuple[str, ...]
    dns_names: tuple[str, ...]
    leader_address: str
    control_port: int
    join_port: int
    ca_pin: str
    join_token: str | None
    join_token_file: Path | None
    data_dir: Path
    port: int
    heartbeat_interval: int
    server: Section | None  # [server]: the managed server's driver settings
    bootstrap_port: int
    log_level: str = "info"  # [agent] log_level; ``tlsroll-agent --log-level`` wins over it

    @property
    def names(self) -> Names:
        return Names.of(self.node_name, self.addresses, self.dns_names)

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        cfg = ConfigFile.load(path)
        node = cfg.section("node")
        leader = cfg.section("leader")
        agent = cfg.section("agent")
        name = node.text("name")
        if problem := node_name_problem(name):
            raise node.error("name", problem)
        pin = leader.text("ca_pin")
        if "\u2026" in pin:  # install.sh's example, "sha256:…": the node has not joined yet
            raise leader.error(
                "ca_pin",
                "still the example's placeholder: this node has not joined yet; on the leader "
                "make its join script (tlsroll token create --node NAME --address IP "
                "--print-join-command), run it here as root, then start the agent (README, "
                '"On real servers", step 7)',
            )
        try:
            pin = parse_pin(pin)
        except ValueError as exc:
            raise leader.error("ca_pin", str(exc)) from None
        if leader.has("join_token") and leader.has("join_token_file"):
            raise leader.error("join_token", "give join_token or join_token_file, not both")
        server = cfg.section("server", required=False)
        config = cls(
            path=Path(path),
            node_name=name,
            addresses=tuple(node.ip_list("addresses")),
            dns_names=tuple(node.str_list("dns_names", [])),
            leader_address=leader.ip("address"),
            control_port=leader.port("control_port", CONTROL_PORT),
            join_port=leader.port("join_port", JOIN_PORT),
            ca_pin=pin,
            join_token=leader.text("join_token", None),
            join_token_file=leader.path("join_token_file", None),
            data_dir=agent.path("data_dir"),
            port=agent.port("port", AGENT_PORT),
            heartbeat_interval=agent.integer(
                "heartbeat_interval", HEARTBEAT_INTERVAL, lo=1, hi=3600
            ),
            server=server if "server" in cfg.data else None,
            bootstrap_port=agent.port("bootstrap_port", BOOTSTRAP_PORT),
            log_level=logs.config_level(agent),
        )
        # Unknown keys are errors; [server]'s are checked by make_driver, once the driver it
        # names has read its own.
        cfg.finish(pending=("server",))
        # Review s47rtin L9: a relative data_dir was taken from wherever the agent was started
        # (a journal and a key of its own in each such place), and a bootstrap port the same as
        # the agent's failed only at the bind.
        if not Path(agent.text("data_dir")).expanduser().is_absolute():
            raise agent.error(
                "data_dir", f"{shown(agent.text('data_dir'))} is not an absolute path; give one"
            )
        if config.bootstrap_port == config.port:
            raise agent.error(
                "bootstrap_port", f"{config.port} is port too; each port must be its own"
            )
        return config
