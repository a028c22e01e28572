"""``batchvision up``: the compose stack as local processes, supervised.

Starts the same processes the compose file does (Redis unless ``BATCHVISION_REDIS_URL`` is
set, ``batchvision api``, ``batchvision worker``, ``batchvision flower``), restarts one that
dies (like ``restart: unless-stopped``), and stops them all on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger("batchvision.up")


@dataclass
class Service:
    """One supervised process."""

    name: str
    argv: list[str]
    env: Mapping[str, str]
    url: str = ""
    health_url: str = ""
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)
    log_path: str = ""

    def start(self) -> None:
        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 - owned by the child
        try:
            self.proc = subprocess.Popen(
                self.argv, env={**os.environ, **self.env}, start_new_session=True, stdout=out, stderr=out
            )
        finally:
            if out is not None:
                out.close()
        self.started_at = time.monotonic()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cli_argv(*args: str) -> list[str]:
    """``batchvision <args>`` run with this interpreter (works without the venv on PATH)."""
    return [sys.executable, "-m", "batchvision.cli", *args]


class Supervisor:
    """Runs services, restarts the ones that exit, stops all on request."""

    def __init__(self, services: list[Service], max_backoff_s: float = 10.0) -> None:
        self.services = services
        self.max_backoff_s = max_backoff_s
        self._stop = threading.Event()

    def start(self) -> None:
        for svc in self.services:
            svc.start()
            log.info("started %s (pid %s)", svc.name, svc.proc.pid if svc.proc else "?")

    def wait_healthy(self, timeout: float = 180.0) -> None:
        """Wait until every service with a health URL answers 200."""
        deadline = time.monotonic() + timeout
        for svc in self.services:
            while svc.health_url and not _ok(svc.health_url):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{svc.name} not healthy at {svc.health_url}")
                self.check_once()
                time.sleep(0.2)

    def check_once(self) -> None:
        """Restart any service that exited (with backoff after quick crashes)."""
        for svc in self.services:
            if svc.proc is not None and svc.proc.poll() is not None and not self._stop.is_set():
                code = svc.proc.returncode
                uptime = time.monotonic() - svc.started_at
                delay = 0.0 if uptime > 30 else min(self.max_backoff_s, 0.5 * 2**svc.restarts)
                log.warning(
                    "%s exited with %s after %.0fs; restarting in %.1fs", svc.name, code, uptime, delay
                )
                if self._stop.wait(delay):
                    return
                svc.restarts += 1
                svc.start()

    def run_forever(self, poll_s: float = 0.5) -> None:
        while not self._stop.wait(poll_s):
            self.check_once()

    def stop(self) -> None:
        """Stop every service, the last started first (Redis last)."""
        self._stop.set()
        for svc in reversed(self.services):
            svc.stop()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: object) -> None:
            log.info("signal %d: stopping all services", signum)
            self._stop.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False
