"""The local runner: supervision (restart what dies, stop everything) and `batchvision up`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchvision.cli.runner import Service, Supervisor

ROOT = Path(__file__).resolve().parents[1]


def test_supervisor_restarts_a_dead_process_and_stops_all() -> None:
    crashy = Service("crashy", [sys.executable, "-c", "import time; time.sleep(0.2)"], {})
    steady = Service("steady", [sys.executable, "-c", "import time; time.sleep(60)"], {})
    sup = Supervisor([crashy, steady], max_backoff_s=0.1)
    sup.start()
    deadline = time.monotonic() + 10
    while crashy.restarts < 2:
        sup.check_once()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert steady.restarts == 0
    sup.stop()
    assert steady.proc is not None and steady.proc.poll() is not None
    assert crashy.proc is not None and crashy.proc.poll() is not None


@pytest.mark.integration
def test_up_starts_the_stack_classifies_and_stops(demo_model: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHVISION_")}
    env["BATCHVISION_MODEL"] = str(demo_model)
    proc = subprocess.run(
        [sys.executable, "-m", "batchvision.cli", "up", "--demo", "--exit-after-demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for name in ("redis", "api", "worker", "flower"):
        assert re.search(rf"^  {name}\s+(redis|http)://127\.0\.0\.1:\d+", out, re.M), out
    assert "succeeded, 12 classified, 0 failed" in out
    rows = re.findall(r"^  (\w+)_\d+\.jpg\s+(\w+)\s+[0-9.]+$", out, re.M)
    assert len(rows) == 12
    assert sum(expected == got for expected, got in rows) >= 11
    time.sleep(0.5)
    leftover = subprocess.run(["pgrep", "-f", str(demo_model)], capture_output=True, text=True).stdout.split()
    assert leftover == [], "processes left running after up stopped"
