"""The private ``rabbitmq-server`` that ``batchvision up --broker rabbitmq`` runs (the RabbitMQ
twin of :mod:`batchvision.cli.redis_server`).

Uses Debian's ``rabbitmq-server`` package (``apt-get install rabbitmq-server``; `make test`
installs it through ``scripts/system-deps.sh``) but none of the machine's configuration: its own
node name, AMQP and distribution ports (free ones), data, log and config files under one
directory, and its own Erlang cookie (``HOME`` is that directory). No plugin is enabled (no
management UI, so no HTTP port to collide). Data survives a restart (durable quorum queues).

The supervisor of ``up`` runs :meth:`RabbitMQNode.argv` with :meth:`RabbitMQNode.env`; a node
started, restarted and killed from Python (the tests, the benchmarks) is
:class:`batchvision.testing.servers.RabbitMQServer`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

from batchvision.cli.local_server import LocalServer
from batchvision.cli.redis_server import free_port

#: Where Debian's package puts the server script that runs as the calling user (the one in
#: /usr/sbin switches to the `rabbitmq` user and the machine's node).
DEBIAN_SCRIPTS = Path("/usr/lib/rabbitmq/bin")


def find_rabbitmq_server() -> Path:
    """Directory holding ``rabbitmq-server`` and ``rabbitmqctl``, or raise with how to get one."""
    candidates = [DEBIAN_SCRIPTS]
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(Path(found).resolve().parent)
    for folder in candidates:
        if (folder / "rabbitmq-server").exists() and (folder / "rabbitmqctl").exists():
            return folder
    raise FileNotFoundError(
        "no rabbitmq-server: `apt-get install rabbitmq-server` (scripts/system-deps.sh does it), "
        "or name a running RabbitMQ in BATCHVISION_BROKER_URL"
    )


def amqp_answers(url: str, timeout: float = 2.0) -> bool:
    """Whether an AMQP handshake (with these credentials) succeeds."""
    from kombu.connection import Connection

    conn = Connection(url, connect_timeout=timeout)  # type: ignore[no-untyped-call, unused-ignore]
    try:
        conn.ensure_connection(max_retries=0, timeout=timeout)  # type: ignore[no-untyped-call, unused-ignore]
        return True
    except Exception:  # noqa: BLE001 - refused, reset, auth, timeout: not ready
        return False
    finally:
        conn.release()  # type: ignore[no-untyped-call, unused-ignore]


class RabbitMQNode(LocalServer):
    """A private RabbitMQ node on ``127.0.0.1:port`` with everything in ``data_dir``."""

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | Path | None = None,
        user: str = "batchvision",
        password: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.user = user
        self.password = password or os.urandom(12).hex()
        super().__init__(data_dir, "batchvision-rabbitmq-")
        self.node = f"bv{self.port}@localhost"

    @property
    def url(self) -> str:
        # `//` at the end: the default virtual host "/".
        return f"amqp://{quote(self.user)}:{quote(self.password)}@127.0.0.1:{self.port}//"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "log" / f"{self.node}.log"

    def prepare(self) -> None:
        """Write its configuration files: call it before running ``argv()`` with ``env()``."""
        (self.data_dir / "log").mkdir(parents=True, exist_ok=True)
        conf = [
            f"listeners.tcp.default = 127.0.0.1:{self.port}",
            f"default_user = {self.user}",
            f"default_pass = {self.password}",
            "loopback_users = none",
            "log.file.level = info",
            "log.console = false",
            # Tests and laptops have little disk: the default 50 MB free-disk alarm is fine,
            # but a memory alarm at 40% of a shared machine would block publishers: use more.
            "vm_memory_high_watermark.relative = 0.8",
            "heartbeat = 30",
        ]
        (self.data_dir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        (self.data_dir / "enabled_plugins").write_text("[].\n")
        (self.data_dir / "rabbitmq-env.conf").write_text("")  # not the machine's /etc one
        cookie = self.data_dir / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(os.urandom(16).hex())
            cookie.chmod(0o400)

    def env(self) -> dict[str, str]:
        """The environment of the server (and of ``rabbitmqctl`` talking to it)."""
        d = self.data_dir
        return {
            "HOME": str(d),  # the Erlang cookie: this node's own
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),  # .conf is appended
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(d / "plugins-expand"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_LOGS": str(self.log_file),
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(d / "feature_flags"),
            "ERL_CRASH_DUMP": str(d / "erl_crash.dump"),
            # Its own port mapper, on loopback: the one Erlang starts otherwise listens on every
            # address (port 4369) and outlives the node; close() stops this one.
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # The distribution listens on loopback only (the machine's node may use another).
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def argv(self) -> list[str]:
        return [str(find_rabbitmq_server() / "rabbitmq-server")]

    def close(self) -> None:
        """Stop the node's port mapper (the node has stopped), then remove a temporary data
        directory."""
        epmd = shutil.which("epmd")
        if epmd is not None:
            # Refuses, harmlessly, when no node started one or a node still uses it.
            subprocess.run(
                [epmd, "-port", str(self.epmd_port), "-kill"],
                env={**os.environ, "ERL_EPMD_ADDRESS": "127.0.0.1"},
                capture_output=True,
                timeout=10,
                check=False,
            )
        super().close()
