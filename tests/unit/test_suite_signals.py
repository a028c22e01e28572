"""A run stopped by SIGTERM (a CI timeout, ``kill``) still tears its fixtures down, so the
servers the suite started do not outlive it (``pytest_configure`` in ``tests/conftest.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

#: A run whose one test holds a fixture and waits (the parent sends SIGTERM meanwhile).
WAITING_RUN = """
import os
import threading

import pytest


@pytest.fixture
def server():
    yield
    with open(os.environ["TORN_DOWN"], "w") as f:
        f.write("torn down")


def test_waits(server):
    with open(os.environ["WAITING"], "w") as f:
        f.write("waiting")
    threading.Event().wait(120)
"""


def test_sigterm_stops_the_run_with_every_teardown(tmp_path: Path, wait_until: Any) -> None:
    (tmp_path / "test_waiting.py").write_text(WAITING_RUN)
    waiting, torn_down = tmp_path / "waiting", tmp_path / "torn_down"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "WAITING": str(waiting),
        "TORN_DOWN": str(torn_down),
    }
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest"]
    proc = subprocess.Popen(
        [*argv, "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(waiting.exists, timeout=60, message="the test starts waiting")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 2, out  # pytest's "interrupted"
    assert torn_down.read_text() == "torn down", out
