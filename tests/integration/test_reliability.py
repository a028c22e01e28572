"""Faults with real processes: workers killed mid-batch, SIGTERM, Redis restarts and outages,
a poison image, result expiry, start-up checks, a pickle message pushed into the queue.

This module runs its own Redis, API and workers with a short visibility timeout, so it can
kill and restart them without disturbing the rest of the suite.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib
import requests

from batchvision.cli.redis_server import RedisServer, free_port
from batchvision.cli.runner import Service, Supervisor, cli_argv
from batchvision.client import Client
from batchvision.core.settings import Settings
from batchvision.core.synthetic import encode, labelled_files, render
from batchvision.server import keys
from batchvision.server.connect import connect_redis
from batchvision.server.failpoints import POISON_MARKER
from batchvision.server.keys import JobKeys
from batchvision.server.queue import CLASSIFY_TASK, create_celery
from batchvision.server.store import JobStore
from batchvision.server.telemetry import Telemetry
from tests.conftest import ARTIFACTS, wait_worker

pytestmark = pytest.mark.integration


class Env:
    """A private stack: Redis (AOF on), the API, and workers started on demand."""

    def __init__(self, settings: Settings, redis: RedisServer, api: Supervisor) -> None:
        self.settings = settings
        self.redis = redis
        self.api = api
        self.url = f"http://127.0.0.1:{settings.api_port}"
        self.client = Client(self.url)
        self.store = JobStore(connect_redis(redis.url), result_ttl_s=60, blob_ttl_s=60)
        self.workers: list[Service] = []

    def worker(self, failpoints: str = "", wait: bool = True, **env: str) -> Service:
        log = ARTIFACTS / f"worker-{len(self.workers)}.log"
        svc = Service(
            "worker",
            cli_argv("worker", "--name", f"w{len(self.workers)}@{free_port()}"),
            {**self.settings.to_env(), "BV_FAILPOINTS": failpoints, **env},
            log_path=str(log),
        )
        svc.start()
        self.workers.append(svc)
        if wait:
            wait_worker(self.settings)
        return svc

    def stop_workers(self) -> None:
        for w in self.workers:
            w.stop(timeout=30)
        self.workers = []

    def wait_progress(self, job_id: str, at_least: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.client.status(job_id)["done"] < at_least:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.02)

    def assert_exactly_once(self, job_id: str, n: int) -> None:
        try:
            status = self.client.wait(job_id, timeout=120, poll_s=0.2)
        except TimeoutError:
            r = self.store.redis
            debug = {
                "queue": r.llen(self.settings.queue),
                "unacked": r.hlen("unacked"),
                "unacked_index": r.zrange("unacked_index", 0, -1, withscores=True),
                "mutex": r.get("unacked_mutex"),
                "tries": r.hgetall(JobKeys.of(job_id).tries),
                "unresolved": self.store.unresolved(job_id, range(n)),
                "now": time.time(),
            }
            raise AssertionError(f"job did not finish: {debug}") from None
        assert status["total"] == n
        assert status["done"] + status["failed"] == n, status
        rows = self.client.results(job_id)
        assert [r["index"] for r in rows] == list(range(n))
        assert all(r["status"] != "pending" for r in rows)
        assert self.store.redis.hlen(JobKeys.of(job_id).results) == n
        assert Telemetry(self.store.redis).pending_images() == 0


@pytest.fixture(scope="module")
def env(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    data = tmp_path_factory.mktemp("redis-aof")
    redis = RedisServer(data_dir=data).start()
    s = settings.replace(
        redis_url=redis.url,
        api_port=free_port(),
        worker_metrics_port=0,  # several workers on one machine
        visibility_timeout_s=6,
        task_time_limit_s=5,
        max_attempts=2,
        chunk_size=8,
        result_ttl_s=600,
    )
    api = Supervisor(
        [
            Service(
                "api",
                cli_argv("api", "--host", "127.0.0.1"),
                s.to_env(),
                health_url=f"http://127.0.0.1:{s.api_port}/healthz",
            )
        ]
    )
    api.start()
    api.wait_healthy(60)
    e = Env(s, redis, api)
    yield e
    e.stop_workers()
    api.stop()
    redis.close()


@pytest.fixture(autouse=True)
def _no_leftover_workers(env: Env) -> Iterator[None]:
    # A worker left running by a failed test would steal the next test's tasks.
    yield
    env.stop_workers()


def _files(n: int, seed: int) -> list[tuple[str, bytes]]:
    return [(name, data) for name, data, _ in labelled_files(n, seed=seed)]


def test_kill_9_mid_batch_loses_nothing_and_doubles_nothing(env: Env) -> None:
    victim = env.worker(failpoints="slow-batch=0.4")
    job = env.client.submit_files(_files(96, seed=1))
    env.wait_progress(job["job_id"], 8)
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    done_at_kill = env.client.status(job["job_id"])["done"]
    assert done_at_kill < 96  # really mid-job
    env.workers.remove(victim)
    env.worker()  # a fresh worker takes over after the visibility timeout
    env.assert_exactly_once(job["job_id"], 96)
    env.stop_workers()


def test_sigterm_mid_batch_finishes_or_requeues(env: Env) -> None:
    w = env.worker(failpoints="slow-batch=0.4")
    job = env.client.submit_files(_files(96, seed=2))
    env.wait_progress(job["job_id"], 8)
    assert w.proc is not None
    w.proc.send_signal(signal.SIGTERM)  # a rolling deploy: warm shutdown
    assert w.proc.wait(60) == 0
    env.workers.remove(w)
    env.worker()  # whatever the stopped worker did not finish was requeued for this one
    env.assert_exactly_once(job["job_id"], 96)
    env.stop_workers()


def test_redis_restart_keeps_accepted_work_and_everyone_reconnects(env: Env) -> None:
    # Accepted while no worker runs, then Redis restarts: the job and its queue survive (AOF).
    job = env.client.submit_files(_files(20, seed=3))
    env.redis.restart()
    assert env.client.status(job["job_id"])["total"] == 20  # the API reconnected by itself
    env.worker()
    env.assert_exactly_once(job["job_id"], 20)
    # Restart Redis under a running, idle worker: it reconnects and keeps consuming.
    env.redis.restart()
    job2 = env.client.submit_files(_files(12, seed=4))
    env.assert_exactly_once(job2["job_id"], 12)
    env.stop_workers()


def test_redis_down_gives_503_never_202_and_recovers(env: Env) -> None:
    env.redis.stop()
    try:
        resp = requests.post(
            f"{env.url}/v1/jobs", files=[("files", f) for f in _files(2, seed=5)], timeout=30
        )
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "unavailable"
        assert resp.headers["Retry-After"]
        ready = requests.get(f"{env.url}/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "redis_unreachable"
        assert requests.get(f"{env.url}/healthz", timeout=10).status_code == 200
    finally:
        env.redis.start()
    assert requests.get(f"{env.url}/readyz", timeout=30).status_code == 200
    resp = requests.post(f"{env.url}/v1/jobs", files=[("files", f) for f in _files(2, seed=5)], timeout=30)
    assert resp.status_code == 202


def _poison_jpeg() -> bytes:
    import numpy as np

    img = render("circle", (120, 90), np.random.default_rng(0))
    return encode(img, "JPEG", comment=POISON_MARKER)


def test_poison_image_ends_as_an_error_after_bounded_attempts(env: Env) -> None:
    files = _files(12, seed=6)
    files.insert(3, ("poison.jpg", _poison_jpeg()))
    # A supervisor restarts the worker each time the poison image kills it (as compose would).
    svc = Service(
        "worker",
        cli_argv("worker", "--name", f"poison@{free_port()}"),
        {**env.settings.to_env(), "BV_FAILPOINTS": "poison-kill"},
        log_path=str(ARTIFACTS / "worker-poison.log"),
    )
    sup = Supervisor([svc], max_backoff_s=1)
    sup.start()
    wait_worker(env.settings)
    runner = threading.Thread(target=sup.run_forever, args=(0.2,), daemon=True)
    runner.start()
    try:
        job = env.client.submit_files(files)
        status = env.client.wait(job["job_id"], timeout=150, poll_s=0.5)
    finally:
        sup.stop()
    assert (status["status"], status["done"], status["failed"]) == ("partial", 12, 1)
    rows = env.client.results(job["job_id"])
    assert rows[3]["filename"] == "poison.jpg"
    assert rows[3]["error"]["code"] == "poison_image"
    assert 1 <= svc.restarts <= env.settings.max_attempts  # bounded: no endless crash loop
    assert env.store.redis.hlen(JobKeys.of(job["job_id"]).results) == 13


def test_expired_job_answers_410(env: Env) -> None:
    s = env.settings.replace(result_ttl_s=1)
    store = JobStore(redis_lib.Redis.from_url(s.redis_url), result_ttl_s=1, blob_ttl_s=60)
    job_id = "expiring" + str(free_port())
    store.create(job_id, model="m")
    store.add_files(job_id, [("a.jpg", "a.jpg")])
    store.record(job_id, [(0, {"error": {"code": "x", "message": "y"}})])
    store.seal(job_id)  # finishes now, with a one-second result TTL
    assert requests.get(f"{env.url}/v1/jobs/{job_id}", timeout=10).status_code == 200
    time.sleep(2.2)
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/results"):
        resp = requests.get(env.url + path, timeout=10)
        assert resp.status_code == 410
        assert resp.json()["error"]["code"] == "job_expired"


def test_worker_refuses_a_visibility_timeout_below_the_time_limit(env: Env) -> None:
    bad = {
        **env.settings.to_env(),
        "BATCHVISION_VISIBILITY_TIMEOUT_S": "5",
        "BATCHVISION_TASK_TIME_LIMIT_S": "10",
    }
    proc = subprocess.run(cli_argv("worker"), env=bad, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "BATCHVISION_VISIBILITY_TIMEOUT_S=5 must be longer than" in proc.stderr


def test_worker_warns_when_redis_may_evict(env: Env) -> None:
    client = redis_lib.Redis.from_url(env.redis.url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        w = env.worker()
        log = Path(w.log_path).read_text()
        assert "maxmemory-policy is 'allkeys-lru'" in log
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        env.stop_workers()


def test_pickle_message_is_rejected_and_the_worker_survives(env: Env) -> None:
    w = env.worker()
    job_id = env.client.open_job()["job_id"]
    name, data = _files(1, seed=9)[0]
    env.store.add_files(job_id, [(name, name)])
    env.store.redis.set(keys.blob(job_id, 0), data)
    evil = create_celery(env.settings)
    evil.conf.accept_content = ["json", "pickle"]
    evil.send_task(CLASSIFY_TASK, args=[job_id, [0]], serializer="pickle", queue=env.settings.queue)
    time.sleep(3)
    assert env.store.unresolved(job_id, [0]) == [0]  # never ran
    assert "ContentDisallowed" in Path(w.log_path).read_text() or "disallowed" in Path(w.log_path).read_text()
    assert w.proc is not None and w.proc.poll() is None  # unharmed
    env.client.cancel(job_id)
    job = env.client.submit_files(_files(4, seed=10))
    env.assert_exactly_once(job["job_id"], 4)
    env.stop_workers()
