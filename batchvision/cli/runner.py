"""``batchvision up``: the compose stack as local processes, supervised.

Starts the same processes the compose file does (Redis unless ``BATCHVISION_REDIS_URL`` is
set, ``batchvision api``, ``batchvision worker``, ``batchvision flower``), restarts one that
dies (like ``restart: unless-stopped``), and stops them all on Ctrl-C or SIGTERM.

Two rules keep it from hanging or looping:

- A service that exits with one of its ``fatal_exit_codes`` (``2``: bad settings, ``3``: it
  cannot start, e.g. a model without labels) is not restarted: restarting cannot fix its
  configuration. :meth:`Supervisor.check_once` raises :class:`ServiceFailed` and the caller
  stops the stack.
- Stopping is bounded: SIGTERM to every service, SIGKILL to the process group of whatever is
  still running after ``stop_grace_s``. Inside :meth:`Supervisor.interruptible` a SIGINT or
  SIGTERM raises :class:`Stopped` at once, whatever the caller is waiting for (a health check,
  a worker's model load, a demo job), so the stack stops within seconds at any point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

log = logging.getLogger("batchvision.up")

#: ``batchvision`` exit codes that mean "my configuration is wrong": 2 bad settings (the
#: worker's checks, `api` refusing to serve anonymously), 3 the worker cannot start.
FATAL_EXIT_CODES = frozenset({2, 3})


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived: stop everything. A ``BaseException``, so no ``except
    Exception`` on the way (in a client call, in kombu) swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class ServiceFailed(RuntimeError):
    """A service exited with a fatal code: restarting it cannot help."""

    def __init__(self, service: Service, code: int, tail: str = "") -> None:
        msg = f"{service.name} exited with code {code}: it cannot start with this configuration"
        msg += f"; its last output:\n{tail}" if tail else " (its error is in the output above)"
        super().__init__(msg)
        self.service = service
        self.code = code


@dataclass
class Service:
    """One supervised process (the leader of its own session and process group)."""

    name: str
    argv: list[str]
    env: Mapping[str, str]
    url: str = ""
    health_url: str = ""
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)
    log_path: str = ""
    #: Exit codes after which the service is not restarted (see :class:`ServiceFailed`).
    fatal_exit_codes: frozenset[int] = FATAL_EXIT_CODES
    #: Started before the others and stopped after them (Redis).
    infrastructure: bool = False
    #: ``ready()`` is true once the service serves; the services after it start only then.
    ready: Callable[[], bool] | None = None

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

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """Ask the service to stop (SIGTERM to its leader, which stops its own children)."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the whole process group: the leader and anything it started."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # nothing left in the group
        if self.proc.poll() is None:
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL to the group after ``timeout`` seconds."""
        if self.proc is None:
            return
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs: killing it", self.name, timeout)
        self.kill()

    def tail(self, lines: int = 20) -> str:
        """The end of the service's log file ('' when it writes to this terminal)."""
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        text = Path(self.log_path).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def cli_argv(*args: str) -> list[str]:
    """``batchvision <args>`` run with this interpreter (works without the venv on PATH)."""
    return [sys.executable, "-m", "batchvision.cli", *args]


class Supervisor:
    """Runs services, restarts the ones that exit, stops all on request."""

    def __init__(
        self, services: list[Service], max_backoff_s: float = 10.0, stop_grace_s: float = 15.0
    ) -> None:
        self.services = services
        self.max_backoff_s = max_backoff_s
        self.stop_grace_s = stop_grace_s
        self._stop = threading.Event()
        #: The read and write ends of a pipe a signal handler writes to (a self-pipe): the
        #: handler cannot set ``_stop``, whose lock the interrupted code may be holding.
        self._wake: tuple[int, int] | None = None
        self._interruptible = False
        self._critical = 0
        self._deferred = False  # a signal arrived inside a critical section: raise after it
        #: The signal that stopped the stack, if one did.
        self.signum: int | None = None

    # -- signals -------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGINT, SIGTERM and SIGHUP stop the stack: inside :meth:`interruptible` by raising
        :class:`Stopped` (at once), elsewhere by ending :meth:`run_forever`. A second signal
        while stopping skips the grace period."""

        if self._wake is None:
            read, write = os.pipe()
            os.set_blocking(write, False)
            self._wake = (read, write)

        def handler(signum: int, _frame: FrameType | None) -> None:
            if self._stopping():
                log.warning("signal %d again: killing what is left", signum)
                self.stop_grace_s = 0.0
                return
            log.info("signal %d: stopping all services", signum, extra={"signal": signum})
            self.signum = signum
            self._ring()
            if self._interruptible:
                if self._critical:
                    self._deferred = True  # raised once the process start is recorded
                else:
                    raise Stopped(signum)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        # The terminal closed (an ssh session dropped): the services run in sessions of their
        # own and never hear of it, so they would outlive this process. Not under nohup (or a
        # supervisor) that asked for hangups to be ignored: there the stack is meant to stay.
        hup = getattr(signal, "SIGHUP", None)
        if hup is not None and signal.getsignal(hup) is not signal.SIG_IGN:
            signal.signal(hup, handler)

    def _stopping(self) -> bool:
        return self._stop.is_set() or self.signum is not None

    def _ring(self) -> None:
        """Wake a :meth:`_wait` (no lock taken: safe in a signal handler)."""
        if self._wake is not None:
            with contextlib.suppress(OSError):  # full: it is awake already
                os.write(self._wake[1], b"\0")

    def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, less once the stack is to stop; whether it is."""
        if self._wake is None:  # no signal handlers: only stop() ends it
            return self._stop.wait(seconds)
        if not self._stopping():
            select.select([self._wake[0]], [], [], seconds)
        return self._stopping()

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A block that a stop signal interrupts by raising :class:`Stopped`."""
        self._interruptible = True
        try:
            if self.signum is not None:
                raise Stopped(self.signum)
            yield
        finally:
            self._interruptible = False

    def raise_if_stopped(self) -> None:
        """:class:`Stopped` if a stop signal arrived. The handler raises it at once, but a
        library on the way may catch and drop it (a bare ``except`` in a broker client, a
        ``__del__``): a wait that loops asks here too, so a stop is never lost."""
        if self.signum is not None:
            raise Stopped(self.signum)

    @contextmanager
    def _uninterrupted(self) -> Iterator[None]:
        # Around starting a process: a Stopped raised between fork and recording the child
        # would leave a process nobody stops.
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if not self._critical and self._deferred and self._interruptible and self.signum is not None:
            self._deferred = False
            raise Stopped(self.signum)

    # -- running -------------------------------------------------------------------------------

    def start(self, ready_timeout: float = 60.0) -> None:
        """Start every service in order; one with a ``ready`` check is waited for first."""
        for svc in self.services:
            self._start(svc)
            pid = svc.proc.pid if svc.proc else None
            log.info("started %s (pid %s)", svc.name, pid, extra={"service_name": svc.name, "child_pid": pid})
            if svc.ready is not None:
                self._wait_ready(svc, ready_timeout)

    def _start(self, svc: Service) -> None:
        with self._uninterrupted():
            svc.start()

    def _wait_ready(self, svc: Service, timeout: float) -> None:
        assert svc.ready is not None
        deadline = time.monotonic() + timeout
        while not svc.ready():
            code = self._exit_code(svc)
            if code is not None:
                # It exited before it served (a port taken, a bad flag): waiting on cannot help.
                raise ServiceFailed(svc, code, svc.tail())
            if time.monotonic() > deadline:
                raise TimeoutError(f"{svc.name} not ready after {timeout:.0f}s")
            time.sleep(0.05)

    def wait_healthy(self, timeout: float = 180.0) -> None:
        """Wait until every service with a health URL answers 200."""
        deadline = time.monotonic() + timeout
        for svc in self.services:
            while svc.health_url and not http_ok(svc.health_url):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{svc.name} not healthy at {svc.health_url}")
                self.check_once()
                time.sleep(0.2)

    def _exit_code(self, svc: Service) -> int | None:
        """The exit code of a service that exited on its own (not because the stack stops)."""
        if svc.proc is None or self._stopping():
            return None
        return svc.proc.poll()

    def check_once(self) -> None:
        """Restart any service that exited (with backoff after quick crashes); raise
        :class:`ServiceFailed` for one that exited with a fatal code."""
        for svc in self.services:
            code = self._exit_code(svc)
            if code is not None:
                if code in svc.fatal_exit_codes:
                    raise ServiceFailed(svc, code, svc.tail())
                uptime = time.monotonic() - svc.started_at
                delay = 0.0 if uptime > 30 else min(self.max_backoff_s, 0.5 * 2 ** min(svc.restarts, 16))
                log.warning(
                    "%s exited with %s after %.0fs; restarting in %.1fs",
                    svc.name,
                    code,
                    uptime,
                    delay,
                    extra={
                        "service_name": svc.name,
                        "exit_code": code,
                        "uptime_s": round(uptime, 3),
                        "restart_in_s": delay,
                    },
                )
                if self._wait(delay):
                    return
                svc.restarts += 1
                self._start(svc)

    def run_forever(self, poll_s: float = 0.5) -> None:
        while not self._wait(poll_s):
            self.check_once()

    def stop(self) -> None:
        """Stop every service: the others first, all at once, then the infrastructure (Redis);
        each wave gets ``stop_grace_s`` before SIGKILL."""
        self._stop.set()
        self._ring()
        self._stop_all([s for s in reversed(self.services) if not s.infrastructure])
        self._stop_all([s for s in reversed(self.services) if s.infrastructure])

    def _stop_all(self, services: list[Service]) -> None:
        for svc in services:
            svc.terminate()
        deadline = time.monotonic() + self.stop_grace_s
        for svc in services:
            while svc.running and time.monotonic() < deadline and self.stop_grace_s > 0:
                time.sleep(0.05)
            if svc.running:
                log.warning("%s did not stop within %.0fs: killing it", svc.name, self.stop_grace_s)
            svc.kill()  # the group too: what a killed leader started must not outlive it


def http_ok(url: str) -> bool:
    """True if ``url`` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False
