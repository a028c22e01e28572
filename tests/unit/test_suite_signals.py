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


#: The same, while the test runs a CLI command in its own process (``main()`` takes SIGTERM
#: for the command's own clean-up while it runs).
WAITING_IN_MAIN = WAITING_RUN.replace(
    """    threading.Event().wait(120)
""",
    """    import importlib
    import signal
    import socket
    import time

    cli = importlib.import_module("batchvision.cli.main")  # the package exports main(), the function

    silent = socket.socket()  # accepts, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()

    def mark_once_main_listens():
        while signal.getsignal(signal.SIGTERM) is not cli._terminate:
            time.sleep(0.01)
        with open(os.environ["IN_MAIN"], "w") as f:
            f.write("in main")

    threading.Thread(target=mark_once_main_listens, daemon=True).start()
    cli.main(["status", "0" * 32, "--api-url", "http://127.0.0.1:%d" % silent.getsockname()[1]])
    with open(os.environ["AFTER"], "w") as f:
        f.write("the run went on")
""",
)


def _run_and_stop(tmp_path: Path, source: str, marker: str, wait_until: Any) -> tuple[int, str]:
    """Run ``source`` as a test file, SIGTERM the run once ``marker`` exists; (exit code, output)."""
    (tmp_path / "test_waiting.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.update({name.upper(): str(tmp_path / name) for name in ("waiting", "torn_down", "in_main", "after")})
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
        wait_until((tmp_path / marker).exists, timeout=60, message=f"the test writes {marker}")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, out


def test_sigterm_stops_the_run_with_every_teardown(tmp_path: Path, wait_until: Any) -> None:
    code, out = _run_and_stop(tmp_path, WAITING_RUN, "waiting", wait_until)
    assert code == 2, out  # pytest's "interrupted"
    assert (tmp_path / "torn_down").read_text() == "torn down", out


def test_sigterm_during_a_cli_command_in_the_test_still_stops_the_run(
    tmp_path: Path, wait_until: Any
) -> None:
    code, out = _run_and_stop(tmp_path, WAITING_IN_MAIN, "in_main", wait_until)
    assert code == 2, out
    assert not (tmp_path / "after").exists(), out  # the command took the signal, the run heard it
    assert (tmp_path / "torn_down").read_text() == "torn down", out
