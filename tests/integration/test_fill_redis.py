"""Fill the Redis: a bulk upload three times the size of Redis' ``maxmemory``, through the CLI,
against a slow (sleeping) model. The byte budget answers ``429`` with ``Retry-After`` long
before Redis would refuse a write; the CLI waits and resumes; nothing is lost.

Real parts: a private ``redis-server`` (``maxmemory`` 64 MB, ``noeviction``), the API under
gunicorn and a worker process (as ``batchvision up`` runs them) serving the sleeping stand-in
model of ``bench/standins.py``, and the ``batchvision submit`` command. Each run goes once as
is and once with the worker killed (SIGKILL) mid-upload and a fresh one started; both on the
Redis broker and on a private RabbitMQ node (marked ``rabbitmq``), Redis staying the job store.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis as redis_lib
import requests
from PIL import Image

from batchvision.server import keys

ROOT = Path(__file__).resolve().parents[2]
MAXMEMORY = 64 * 2**20
IMAGE_SIDE = 512  # a noise PNG of 512x512 RGB: about 0.77 MiB that no compression shrinks
IMAGES = 3 * MAXMEMORY // (3 * IMAGE_SIDE * IMAGE_SIDE) + 1


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
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def slow_stack(
    broker: str, start_private_stack: Callable[..., Any], monkeypatch_module: pytest.MonkeyPatch
) -> Any:
    """The module's private stack (``start_private_stack`` in ``conftest.py``: its own Redis,
    the API, workers started by each test, RabbitMQ as the broker when ``broker`` says so),
    serving the sleeping stand-in model, its Redis' ``maxmemory`` set to :data:`MAXMEMORY`."""
    # The children import this tree and the stand-in models; 8 images per 0.4 s: 20 images a
    # second, so the queue drains slower than the CLI uploads.
    paths = [str(ROOT / "bench"), os.environ.get("PYTHONPATH", str(ROOT))]
    monkeypatch_module.setenv("PYTHONPATH", os.pathsep.join(paths))
    monkeypatch_module.setenv("BENCH_SLEEP_S", "0.4")
    stack = start_private_stack(
        f"fill-{broker}",
        broker=broker,
        model="py:standins:sleeping",  # bench/standins.py, on PYTHONPATH above
        max_batch_size=8,
        chunk_size=8,
        # A killed worker's tasks go back to the queue after the visibility timeout (Redis
        # broker); short, so the kill variant recovers within the test.
        visibility_timeout_s=10,
        task_time_limit_s=5,
    )
    with redis_lib.Redis.from_url(stack.redis.url) as r:
        r.config_set("maxmemory", MAXMEMORY)  # the server runs with noeviction
    return stack


@pytest.fixture(scope="module")
def stack_redis(slow_stack: Any) -> Iterator[redis_lib.Redis]:
    """A client of the stack's Redis (the job store on either broker)."""
    with redis_lib.Redis.from_url(slow_stack.redis.url) as r:
        yield r


def _responses(api: str, status: str) -> int:
    """How many requests the API answered with ``status`` (its Prometheus histogram counts)."""
    text = requests.get(f"{api}/metrics", timeout=10).text
    pattern = rf'^batchvision_http_request_duration_seconds_count\{{[^}}]*status="{status}"[^}}]*\}} (\S+)$'
    return int(sum(float(m) for m in re.findall(pattern, text, re.M)))


@pytest.mark.parametrize(
    "broker", ["redis", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)], indirect=True, scope="module"
)
@pytest.mark.parametrize("kill_worker", [False, True], ids=["", "kill-9-worker"])
def test_an_upload_three_times_redis_memory_waits_and_resumes_and_loses_nothing(
    slow_stack: Any,
    stack_redis: redis_lib.Redis,
    folder: Path,
    tmp_path: Path,
    kill_worker: bool,
    wait_until: Callable[..., Any],
) -> None:
    """With ``kill_worker``, the worker process is killed (SIGKILL) mid-upload, once some
    batches are done, and a fresh one started: the same holds."""
    stack = slow_stack
    api = stack.url
    out = tmp_path / "results.csv"
    total_bytes = sum(p.stat().st_size for p in folder.iterdir())
    assert total_bytes > 3 * MAXMEMORY * 0.95
    # The API outlives the variants on its stack: compare its counts with those before this run.
    before = {status: _responses(api, status) for status in ("429", "500", "503")}
    r = stack_redis
    r.delete(keys.BATCH_LOG)
    env = {**os.environ, "BATCHVISION_API_URL": api}
    log = (tmp_path / "submit.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchvision.cli", "submit", str(folder), "--wait", "-o", str(out)]
        + ["--part-mb", "4", "--no-progress"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # No worker drains the queue until the budget has held an upload back: the 429 happens
        # whatever the machine's speed, not only when the CLI uploads faster than the model.
        wait_until(lambda: _responses(api, "429") > before["429"], timeout=300, interval=0.2, message="a 429")
        victim = stack.worker()
        if kill_worker:
            wait_until(
                lambda: r.llen(keys.BATCH_LOG) >= 3,
                timeout=120,
                interval=0.05,
                message="3 batches classified",
            )
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGKILL)  # the Celery worker itself (it execs celery)
            victim.proc.wait()
            assert proc.poll() is None  # really mid-upload
            stack.workers.remove(victim)
            stack.worker()  # a fresh worker takes over what the killed one held
        assert proc.wait(timeout=600) == 0, (tmp_path / "submit.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        stack.stop_workers()
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["filename"] for r in rows) == sorted(p.name for p in folder.iterdir())
    assert all(r["label"] and not r["error"] for r in rows), [r for r in rows if r["error"]][:3]
    after = {status: _responses(api, status) for status in ("429", "500", "503")}
    assert after["429"] > before["429"]  # the budget held uploads back...
    assert (after["500"], after["503"]) == (before["500"], before["503"])  # ...before Redis refused one
    assert int(r.get(keys.PENDING) or 0) == 0
    assert int(r.get(keys.PENDING_BYTES) or 0) == 0
    assert r.hlen(keys.QUOTA) == 0
    assert "errorstat_OOM" not in r.info("errorstats")  # Redis never had to refuse a write
