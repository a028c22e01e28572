"""A private ``rabbitmq-server`` for local runs and tests (the RabbitMQ twin of
:mod:`batchvision.cli.redis_server`).

Uses Debian's ``rabbitmq-server`` package (``apt-get install rabbitmq-server``; `make test`
installs it through ``scripts/system-deps.sh``) but none of the machine's configuration: its own
node name, AMQP and distribution ports (free ones), data, log and config files under one
directory, and its own Erlang cookie (``HOME`` is that directory). No plugin is enabled (no
management UI, so no HTTP port to collide). Data survives a restart of this server (durable
quorum queues), which the tests do on purpose.

``RabbitMQServer(url=...)`` instead reuses a server that already runs (the machine's own, or a
cluster): ``start`` only waits for it to answer, ``stop`` does nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote, urlparse

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
        "or point BV_RABBITMQ_URL at a running server"
    )


def have_rabbitmq() -> bool:
    try:
        find_rabbitmq_server()
    except FileNotFoundError:
        return False
    return True


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


class RabbitMQServer(LocalServer):
    """A private RabbitMQ node on ``127.0.0.1:port`` with everything in ``data_dir``.

    ``url``: reuse that running server instead (nothing is started or stopped).
    """

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | Path | None = None,
        user: str = "batchvision",
        password: str | None = None,
        url: str | None = None,
    ) -> None:
        self.external = url or ""
        self.port = port or (urlparse(url).port or 5672 if url else free_port())
        self.dist_port = free_port()
        self.user = user
        self.password = password or os.urandom(12).hex()
        super().__init__(data_dir, "batchvision-rabbitmq-")
        self.node = f"bv{self.port}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.external:
            return self.external
        # `//` at the end: the default virtual host "/".
        return f"amqp://{quote(self.user)}:{quote(self.password)}@127.0.0.1:{self.port}//"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "log" / f"{self.node}.log"

    def prepare(self) -> None:
        """Write its configuration (``start`` does; a supervisor that runs ``argv()`` with
        ``env()`` itself calls it first)."""
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
            # The distribution listens on loopback only (the machine's node may use another).
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def argv(self) -> list[str]:
        return [str(find_rabbitmq_server() / "rabbitmq-server")]

    def start(self, timeout: float = 90.0) -> RabbitMQServer:
        """Start the node (or find the external one) and wait until it accepts AMQP logins."""
        if not self.external:
            self.prepare()
            out = open(self.data_dir / "server.out", "ab")  # noqa: SIM115 - owned by the child
            try:
                # Its own process group: the shell wrapper and the Erlang VM stop together.
                self.proc = subprocess.Popen(
                    self.argv(),
                    env={**os.environ, **self.env()},
                    cwd=self.data_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                )
            finally:
                out.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not amqp_answers(self.url, timeout=1.0):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited ({self.proc.returncode}): see {self.diagnose()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"rabbitmq-server on port {self.port} is not up: see {self.diagnose()}")
            time.sleep(0.2)

    def diagnose(self) -> str:
        return f"{self.log_file} and {self.data_dir / 'server.out'}"

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl`` against this node; returns its output."""
        if self.external:
            raise RuntimeError("rabbitmqctl is only run against a server this object started")
        proc = subprocess.run(
            [str(find_rabbitmq_server() / "rabbitmqctl"), "-n", self.node, *args],
            env={**os.environ, **self.env()},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {proc.stderr or proc.stdout}")
        return proc.stdout

    def pid(self) -> int | None:
        """The Erlang VM's pid (for CPU accounting), if this object started it."""
        try:
            return int((self.data_dir / "rabbitmq.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, kill: bool = False) -> None:
        """Stop the node (``kill``: SIGKILL to the VM, no clean shutdown)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if kill:
            try:  # the shell wrapper exits first; make sure the VM is gone too
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._wait_port_free()
        self.proc = None

    def _wait_port_free(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)
