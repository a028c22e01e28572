"""Fill the Redis: a bulk upload three times the size of Redis' ``maxmemory``, through the CLI,
against a slow (sleeping) model. The byte budget answers ``429`` with ``Retry-After`` long
before Redis would refuse a write; the CLI waits and resumes; nothing is lost.

Real parts: a private ``redis-server`` (``maxmemory`` 64 MB, ``noeviction``), the API under
gunicorn and a worker process (as ``batchvision up`` runs them) serving the sleeping stand-in
model of ``bench/standins.py``, and the ``batchvision submit`` command.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis as redis_lib
import requests
from PIL import Image

from batchvision.cli.local import stack as local_stack
from batchvision.cli.redis_server import free_port
from batchvision.cli.runner import Supervisor
from batchvision.core.settings import Settings
from batchvision.server import keys
from batchvision.testing.servers import RedisServer

ROOT = Path(__file__).resolve().parents[2]
MAXMEMORY = 64 * 2**20
IMAGE_SIDE = 512  # a noise PNG of 512x512 RGB: about 0.77 MiB that no compression shrinks
IMAGES = 3 * MAXMEMORY // (3 * IMAGE_SIDE * IMAGE_SIDE) + 1


@pytest.fixture(scope="module")
def full_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        client = redis_lib.Redis.from_url(server.url)
        client.config_set("maxmemory", MAXMEMORY)  # the server runs with noeviction
        client.close()
        yield server


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``IMAGES`` noise PNGs (eight distinct ones, each under many names): three times maxmemory."""
    root = tmp_path_factory.mktemp("fill")
    rng = np.random.default_rng(7)
    variants = []
    for _ in range(8):
        path = root / "variant.png"
        pixels = rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, compress_level=1)
        variants.append(path.read_bytes())
    path.unlink()
    for i in range(IMAGES):
        (root / f"{i:04d}.png").write_bytes(variants[i % len(variants)])
    return root


@pytest.fixture(scope="module")
def slow_stack(full_redis: RedisServer, monkeypatch_module: pytest.MonkeyPatch) -> Iterator[Settings]:
    settings = Settings.from_env(
        {},
        redis_url=full_redis.url,
        model="py:standins:sleeping",  # bench/standins.py, on PYTHONPATH below
        api_port=free_port(),
        worker_metrics_port=free_port(),
        max_batch_size=8,
        chunk_size=8,
        visibility_timeout_s=60,
        task_time_limit_s=30,
    )
    # The children import this tree and the stand-in models; 8 images per 0.4 s: 20 images a
    # second, so the queue drains slower than the CLI uploads.
    paths = [str(ROOT / "bench"), os.environ.get("PYTHONPATH", str(ROOT))]
    monkeypatch_module.setenv("PYTHONPATH", os.pathsep.join(paths))
    monkeypatch_module.setenv("BENCH_SLEEP_S", "0.4")
    sup = Supervisor([s for s in local_stack(settings, None, flower=False) if s.name in ("api", "worker")])
    sup.start()
    try:
        sup.wait_healthy(timeout=120)
        yield settings
    finally:
        sup.stop()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _responses(api: str, status: str) -> int:
    """How many requests the API answered with ``status`` (its Prometheus histogram counts)."""
    text = requests.get(f"{api}/metrics", timeout=10).text
    pattern = rf'^batchvision_http_request_duration_seconds_count\{{[^}}]*status="{status}"[^}}]*\}} (\S+)$'
    return int(sum(float(m) for m in re.findall(pattern, text, re.M)))


def test_an_upload_three_times_redis_memory_waits_and_resumes_and_loses_nothing(
    slow_stack: Settings,
    folder: Path,
    full_redis: RedisServer,
    tmp_path: Path,
    wait_worker: Callable[[Settings], None],
) -> None:
    settings = slow_stack
    wait_worker(settings)
    api = f"http://127.0.0.1:{settings.api_port}"
    out = tmp_path / "results.csv"
    total_bytes = sum(p.stat().st_size for p in folder.iterdir())
    assert total_bytes > 3 * MAXMEMORY * 0.95
    env = {**os.environ, "BATCHVISION_API_URL": api}
    proc = subprocess.run(
        [sys.executable, "-m", "batchvision.cli", "submit", str(folder), "--wait", "-o", str(out)]
        + ["--part-mb", "4", "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["filename"] for r in rows) == sorted(p.name for p in folder.iterdir())
    assert all(r["label"] and not r["error"] for r in rows), [r for r in rows if r["error"]][:3]
    assert _responses(api, "429") > 0  # the budget held uploads back...
    assert _responses(api, "500") == 0 and _responses(api, "503") == 0  # ...before Redis refused one
    with redis_lib.Redis.from_url(full_redis.url) as r:
        assert int(r.get(keys.PENDING) or 0) == 0
        assert int(r.get(keys.PENDING_BYTES) or 0) == 0
        assert r.hlen(keys.QUOTA) == 0
        assert "errorstat_OOM" not in r.info("errorstats")  # Redis never had to refuse a write
