"""``batchvision up`` as a real process, stopped by what stops it in real life: a service that
cannot start with its configuration (a model without labels: the worker exits with code 3),
SIGTERM while the worker loads its model, Ctrl-C (SIGINT) while the stack starts.

Each time ``up`` must exit promptly with the right code and leave no process behind: every
service runs in its own session, so "nothing left" is checked per session, which also
catches what a service started (gunicorn's workers, Celery's children).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Up:
    """A running ``batchvision up`` with its output in files (no pipe to fill up)."""

    def __init__(self, cwd: Path, env: dict[str, str], wait_until: Callable[..., Any]) -> None:
        self.wait_until = wait_until
        self.out = cwd / "up.out"
        self.err = cwd / "up.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "batchvision.cli", "up"], cwd=cwd, env=env, stdout=out, stderr=err
            )

    def output(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def started(self) -> dict[str, int]:
        """Service name -> pid, from up's log lines."""
        return {name: int(pid) for name, pid in re.findall(r"started (\w+) \(pid (\d+)\)", self.output())}

    def wait_for(self, pattern: str, timeout: float) -> None:
        def logged() -> bool:
            if re.search(pattern, self.output()):
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"up exited ({self.proc.returncode}) before {pattern!r}:\n{self.tail()}")
            return False

        try:
            self.wait_until(logged, timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tail()}") from None

    def tail(self) -> str:
        return self.output()[-4000:]

    def kill(self) -> None:
        # A failed test must not leave the stack running: up first, then what it started.
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.started().values():
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _left_in_sessions(sessions: set[int]) -> list[str]:
    left = []
    for p in psutil.process_iter(["pid", "name", "status"]):
        try:
            if os.getsid(p.pid) in sessions and p.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {p.info['name']} (session {os.getsid(p.pid)})")
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return left


@pytest.fixture()
def run_up(tmp_path: Path, wait_until: Callable[..., Any]) -> Iterator[Callable[..., Up]]:
    runs: list[Up] = []

    def start(**env: str) -> Up:
        base = {k: v for k, v in os.environ.items() if not k.startswith("BATCHVISION_")}
        up = Up(tmp_path, {**base, **env}, wait_until)
        runs.append(up)
        return up

    yield start
    for up in runs:
        up.kill()


def _exits_within(up: Up, seconds: float) -> int:
    try:
        return up.proc.wait(seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"up still running {seconds:.0f}s later:\n{up.tail()}") from None


def _nothing_left(up: Up, wait_until: Callable[..., Any]) -> None:
    started = up.started()
    assert {"redis", "api", "worker"} <= set(started), up.tail()
    sessions = set(started.values())
    # Already gone when up returns (it waits for each service); the short wait only absorbs
    # the moment the kernel takes to reap a SIGKILLed group.
    wait_until(lambda: not _left_in_sessions(sessions), timeout=3, message="every process of the stack exits")


def test_a_worker_that_cannot_start_stops_the_stack_with_its_error(
    demo_model: Path, tmp_path: Path, run_up: Callable[..., Up], wait_until: Callable[..., Any]
) -> None:
    lonely = tmp_path / "nolabels" / "model.keras"
    lonely.parent.mkdir()
    shutil.copy(demo_model, lonely)  # no model.labels.txt beside it
    up = run_up(BATCHVISION_MODEL=str(lonely))
    start = time.monotonic()
    code = _exits_within(up, 180)
    out = up.output()
    assert code == 1, up.tail()
    assert "no labels for" in out and "BATCHVISION_LABELS" in out, up.tail()  # the worker's own words
    assert "worker exited with code 3" in out, up.tail()
    assert "restarting" not in out, "a worker that cannot start is not restarted"
    _nothing_left(up, wait_until)
    print(f"up gave up after {time.monotonic() - start:.1f}s")


def test_sigterm_while_the_worker_loads_stops_everything_within_seconds(
    demo_model: Path, run_up: Callable[..., Up], wait_until: Callable[..., Any]
) -> None:
    up = run_up(BATCHVISION_MODEL=str(demo_model))
    up.wait_for(r"waiting for the worker to load its model", timeout=180)
    assert "batchvision is up" not in up.output()
    signalled = time.monotonic()
    up.proc.send_signal(signal.SIGTERM)
    code = _exits_within(up, 20)  # seconds, where waiting for the model would take minutes
    print(f"stopped {time.monotonic() - signalled:.1f}s after SIGTERM")
    assert code == 128 + signal.SIGTERM, up.tail()
    # Stopped where it waited, not once the model happened to be loaded.
    assert "batchvision is up" not in up.output(), up.tail()
    _nothing_left(up, wait_until)


def test_ctrl_c_while_the_stack_starts_stops_everything_within_seconds(
    demo_model: Path, run_up: Callable[..., Up], wait_until: Callable[..., Any]
) -> None:
    up = run_up(BATCHVISION_MODEL=str(demo_model))
    up.wait_for(r"started worker \(pid \d+\)", timeout=60)  # the API is not healthy yet
    signalled = time.monotonic()
    up.proc.send_signal(signal.SIGINT)
    code = _exits_within(up, 20)  # seconds, where waiting for the model would take minutes
    print(f"stopped {time.monotonic() - signalled:.1f}s after SIGINT")
    assert code == 128 + signal.SIGINT, up.tail()
    _nothing_left(up, wait_until)
