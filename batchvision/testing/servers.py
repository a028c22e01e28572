"""A private ``redis-server`` or ``rabbitmq-server`` started, restarted and killed from Python:
the servers of the tests and the benchmarks, each on free ports with its own data directory.

How each is run (binary, command line, environment, configuration files) is the product's own
description, shared with ``batchvision up``: :class:`~batchvision.cli.redis_server.RedisNode`
and :class:`~batchvision.cli.rabbitmq_server.RabbitMQNode`. This module adds the process::

    with RedisServer() as redis:       # started, answering PING
        ...
        redis.restart()                # same port and data: what it persisted comes back
        redis.stop(kill=True)          # SIGKILL, no final AOF flush
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Self

import redis

from batchvision.cli.local_server import LocalServer
from batchvision.cli.rabbitmq_server import RabbitMQNode, amqp_answers, find_rabbitmq_server
from batchvision.cli.redis_server import RedisNode, free_port


class ServerProcess(LocalServer):
    """What a started server offers: ``start``, ``stop``, ``restart``, ``close`` (stop, then
    remove a temporary data directory) and ``with`` (start ... close). Mixed in before the
    node class that describes the server."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self, kill: bool = False) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        """Stop and start on the same ports and data: what the server persisted comes back."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        super().close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisServer(ServerProcess, RedisNode):
    """A started private ``redis-server`` (see :class:`~batchvision.cli.redis_server.RedisNode`
    for the arguments)."""

    proc: subprocess.Popen[bytes] | None = None
    _started = False  # once started, the port is kept: clients hold the URL

    def start(self, timeout: float = 10.0, port_busy_s: float = 30.0) -> Self:
        """Start the server and wait until it answers PING.

        A free port is only free a moment: another process may bind it before the server
        does. On a first start of a port chosen here, no client knows the URL yet, so a taken
        port is given up for a new free one. A restart (or a port given by the caller) keeps
        its port: it may be taken for a moment (while the server was down another process's
        outgoing connection may have been given it), so such a start is tried again for up to
        ``port_busy_s``, as a supervisor would."""
        deadline = time.monotonic() + port_busy_s
        while True:
            log = self.data_dir / "redis.log"
            logged = log.stat().st_size if log.exists() else 0
            self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                self.wait_ready(timeout)
                self._started = True
                return self
            except RuntimeError:
                with open(log, "rb") as fh:
                    fh.seek(logged)
                    busy = b"Address already in use" in fh.read()
                if not busy or time.monotonic() > deadline:
                    raise
                self.proc = None
                if self._started or not self.port_chosen:
                    time.sleep(0.5)
                else:
                    self.port = free_port()

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


def have_rabbitmq() -> bool:
    """Whether Debian's ``rabbitmq-server`` is installed (tests skip their RabbitMQ variants
    without it)."""
    try:
        find_rabbitmq_server()
    except FileNotFoundError:
        return False
    return True


class RabbitMQServer(ServerProcess, RabbitMQNode):
    """A started private RabbitMQ node (see :class:`~batchvision.cli.rabbitmq_server.RabbitMQNode`
    for the arguments)."""

    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> Self:
        """Start the node and wait until it accepts AMQP logins."""
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
        """The Erlang VM's pid (for CPU accounting)."""
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
