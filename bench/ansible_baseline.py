"""The Ansible baseline of ``bench.rollout``: what a playbook costs for the same per-node work
on the same nodes, in the same run.

Per node, serial 1, local connection, no fact gathering (Ansible doing less than tlsroll):
an http check of the app, copying the server's config into place, restarting the same
reference server through its pid file (SIGTERM, wait for the exit, start it again detached),
waiting for port 8080, and the http check again. Timed from the start of ``ansible-playbook``
to its exit; bounded (30 s + 15 s per node). ansible-core comes with the ``bench`` extra
(``pip install -e '.[bench]'``); without it the baseline says so and the benchmark goes on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.nodeside import Node

PLAYBOOK = """\
- name: restart the reference server, one node at a time
  hosts: nodes
  serial: 1
  gather_facts: false
  tasks:
    - name: the app answers on http
      ansible.builtin.uri:
        url: "{{ app_url }}health"
        status_code: 200
    - name: the server's config in place
      ansible.builtin.copy:
        src: "{{ config_src }}"
        dest: "{{ config_file }}"
        mode: "0600"
    - name: restart the server
      ansible.builtin.shell: |
        pid=$(cat "{{ pid_file }}")
        kill -TERM "$pid"
        while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
        setsid "{{ python }}" -m refserver --config "{{ config_file }}" \\
          >>"{{ log_file }}" 2>&1 </dev/null &
    - name: port 8080 open
      ansible.builtin.wait_for:
        host: "{{ address }}"
        port: 8080
        timeout: 30
    - name: the app answers on http again
      ansible.builtin.uri:
        url: "{{ app_url }}health"
        status_code: 200
      register: health
      retries: 50
      delay: 0.1
      until: health.status == 200
"""


@dataclass(frozen=True)
class Result:
    ok: bool
    seconds: float
    problem: str = ""


def executable() -> str | None:
    """ansible-playbook beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "ansible-playbook"
    return str(beside) if beside.exists() else shutil.which("ansible-playbook")


def inventory(nodes: Sequence[Node], work: Path) -> dict[str, object]:
    hosts: dict[str, dict[str, str]] = {}
    for n in nodes:
        src = work / f"{n.name}.toml"
        src.write_bytes(n.server.config_path.read_bytes())
        hosts[n.name] = {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "address": n.address,
            "app_url": n.http_url(),
            "config_src": str(src),
            "config_file": str(n.server.config_path),
            "pid_file": str(n.server_data_dir / "refserver.pid"),
            "log_file": str(n.server.log_path),
            "python": sys.executable,
        }
    return {"nodes": {"hosts": hosts}}


def run(nodes: Sequence[Node], work: Path) -> Result:
    """Run the playbook over ``nodes`` (on http); its wall time."""
    playbook = executable()
    if playbook is None:
        return Result(False, 0.0, "ansible-playbook not installed (pip install -e '.[bench]')")
    work.mkdir(parents=True, exist_ok=True)
    (work / "inventory.json").write_text(json.dumps(inventory(nodes, work)))
    (work / "playbook.yml").write_text(PLAYBOOK)
    env = {
        **os.environ,
        "ANSIBLE_HOME": str(work / "home"),
        "ANSIBLE_LOCAL_TEMP": str(work / "tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }
    argv = [playbook, "-i", str(work / "inventory.json"), str(work / "playbook.yml")]
    t0 = time.perf_counter()
    log = (work / "ansible.log").open("w")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    deadline = t0 + 30 + 15 * len(nodes)
    # The servers this benchmark started are its children: reap each one the playbook stops,
    # or it stays a zombie that `kill -0` still finds (a server under systemd has no such
    # parent).
    while proc.poll() is None and time.perf_counter() < deadline:
        for n in nodes:
            if n.server.proc is not None:
                n.server.proc.poll()
        time.sleep(0.01)
    elapsed = time.perf_counter() - t0
    log.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
        return Result(False, elapsed, "the playbook did not finish in time")
    output = (work / "ansible.log").read_text(errors="replace")
    if proc.returncode != 0:
        tail = output.strip().splitlines()[-3:]
        return Result(False, elapsed, f"playbook failed ({proc.returncode}): {' | '.join(tail)}")
    return Result(True, elapsed)
