#!/usr/bin/env bash
# Install tlsroll on a server node: a virtual environment in /opt/tlsroll, the systemd units,
# and a dedicated user for the leader. Run as root from a checkout; it changes nothing else.
#   deploy/install.sh leader|agent
set -euo pipefail
role=${1:?usage: install.sh leader|agent}
here=$(cd "$(dirname "$0")/.." && pwd)
python3 -m venv /opt/tlsroll
/opt/tlsroll/bin/pip install --quiet --upgrade pip
/opt/tlsroll/bin/pip install --quiet "$here"
install -d -m 0755 /etc/tlsroll
case "$role" in
  leader)
    id tlsroll >/dev/null 2>&1 || useradd --system --home /var/lib/tlsroll --shell /usr/sbin/nologin tlsroll
    install -m 0644 "$here/deploy/systemd/tlsroll-leader.service" /etc/systemd/system/
    echo "next: sudo -u tlsroll /opt/tlsroll/bin/tlsroll init --data-dir /var/lib/tlsroll --address IP --node-name NAME"
    echo "      systemctl enable --now tlsroll-leader"
    ;;
  agent)
    install -m 0644 "$here/deploy/systemd/tlsroll-agent.service" /etc/systemd/system/
    [ -e /etc/tlsroll/agent.toml ] || install -m 0600 "$here/deploy/examples/agent.toml" /etc/tlsroll/agent.toml
    echo "next: edit /etc/tlsroll/agent.toml, put the join token in /etc/tlsroll/join-token (0600),"
    echo "      systemctl enable --now tlsroll-agent"
    ;;
  *) echo "install.sh: unknown role $role (leader or agent)" >&2; exit 2 ;;
esac
systemctl daemon-reload 2>/dev/null || true
