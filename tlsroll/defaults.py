"""Names, ports and paths both sides agree on."""

from pathlib import Path

LEADER_NAME = "tlsroll-leader"  # CN of the leader's certificate; reserved, no node may take it
CONTROL_PORT = 9440  # leader, mutual TLS: agents call Leader
JOIN_PORT = 9441  # leader, server TLS only: agents call Enrolment with a join token
AGENT_PORT = 9442  # agent, mutual TLS: the leader calls NodeAgent
BOOTSTRAP_PORT = 9443  # agent, https: workstations fetch the CA and enrol (the seed's port)
HTTP_PORT = 8080  # managed server before the switch (the seed's)
HTTPS_PORT = 8443  # managed server after the switch (the seed's)
VIEWER_PORT = 9444  # leader, https: the read-only web viewer of the schema (0 in leader.toml: off)
HEARTBEAT_INTERVAL = 5
# Seconds: the longest scope freeze lease (leader.toml scope_freeze_lease at most; an agent
# grants no longer, so a lease it cannot read has surely run out after this long).
MAX_FREEZE_LEASE = 86400
DEBUG_ENV = "TLSROLL_DEBUG"  # =1: an error nobody foresaw shows its traceback (CLI, daemons)
DEFAULT_DATA_DIR = Path("/var/lib/tlsroll")  # the leader's data directory
AGENT_DATA_DIR = Path("/var/lib/tlsroll-agent")  # the installed agent's (its config's default)
