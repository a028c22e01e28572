"""What ``batchvision up`` exposes, with the real command: every listener of the stack is on
loopback, no secret is on a process's command line (the Flower login and a Redis URL with its
password travel in the environment), and the API answers loopback ``Host`` names only (a page
that rebinds its DNS name to 127.0.0.1 still sends its own name)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from batchvision.cli.redis_server import free_port
from batchvision.testing.servers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOOPBACK = ("127.0.0.1", "::1")


def _started(output: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in re.findall(r"started (\w+) \(pid (\d+)\)", output)}


def _stack_processes(sessions: set[int]) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) in sessions:
                out.append(p)
        except (ProcessLookupError, PermissionError):
            continue
    return out


def test_up_listens_on_loopback_only_keeps_secrets_off_argv_and_checks_host(
    demo_model: Path, tmp_path: Path, wait_until: Callable[..., Any]
) -> None:
    flower_password = "flower-pw-" + os.urandom(6).hex()
    redis_password = "redis-pw-" + os.urandom(6).hex()
    redis = RedisServer(password=redis_password).start()  # up uses it: its URL has the password
    ports = {name: free_port() for name in ("API_PORT", "FLOWER_PORT", "WORKER_METRICS_PORT")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHVISION_")}
    env.update({f"BATCHVISION_{k}": str(v) for k, v in ports.items()})
    env.update(
        BATCHVISION_MODEL=str(demo_model),
        BATCHVISION_REDIS_URL=redis.url,
        BATCHVISION_FLOWER_USER="admin",
        BATCHVISION_FLOWER_PASSWORD=flower_password,
    )
    out_path = tmp_path / "up.out"
    with open(out_path, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "batchvision.cli", "up"], cwd=tmp_path, env=env, stdout=out, stderr=out
        )
    sessions: set[int] = set()
    try:

        def ready() -> bool:
            assert up.poll() is None, out_path.read_text(errors="replace")[-3000:]
            return "batchvision is up" in out_path.read_text(errors="replace")

        wait_until(ready, timeout=240, interval=0.2, message="batchvision is up")
        started = _started(out_path.read_text(errors="replace"))
        assert {"api", "worker", "flower"} <= set(started), started
        sessions = set(started.values())
        listening: dict[int, str] = {}
        for p in _stack_processes(sessions):
            try:
                cmdline = " ".join(p.cmdline())
                conns = p.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            assert flower_password not in cmdline and redis_password not in cmdline, cmdline
            for c in conns:
                if c.status == psutil.CONN_LISTEN:
                    listening[c.laddr.port] = c.laddr.ip
        assert set(ports.values()) <= set(listening), (ports, listening)
        exposed = {port: ip for port, ip in listening.items() if ip not in LOOPBACK}
        assert not exposed, f"listening beyond loopback: {exposed}"
        api = f"http://127.0.0.1:{ports['API_PORT']}"
        job = "0" * 32
        assert requests.get(f"{api}/v1/jobs/{job}", timeout=10).status_code == 404  # 127.0.0.1:port
        for name in ("localhost", f"localhost:{ports['API_PORT']}", f"[::1]:{ports['API_PORT']}"):
            assert requests.get(f"{api}/v1/jobs/{job}", headers={"Host": name}, timeout=10).status_code == 404
        rebound = requests.get(f"{api}/v1/jobs/{job}", headers={"Host": "attacker.example"}, timeout=10)
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "bad_host", rebound.text
        page = requests.get(f"{api}/", headers={"Host": f"attacker.example:{ports['API_PORT']}"}, timeout=10)
        assert page.status_code == 400
        # without keys, the webhook secret is not served over HTTP
        secret = requests.get(f"{api}/v1/webhook-secret", timeout=10)
        assert secret.status_code == 403 and secret.json()["error"]["code"] == "webhook_secret_needs_keys"
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
        for pid in sessions:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        redis.close()
