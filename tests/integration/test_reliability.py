"""Faults with real processes: workers killed mid-batch, SIGTERM, Redis restarts and outages,
a poison image, result expiry, start-up checks, a pickle message pushed into the queue.

This module runs its own Redis, API and workers with a short visibility timeout, so it can
kill and restart them without disturbing the rest of the suite.

the faults that concern the queue run on both brokers (``@on_both_brokers``): Redis,
and RabbitMQ (a private ``rabbitmq-server``, marked ``rabbitmq``). With RabbitMQ, "the broker"
restarts and goes down as well as Redis, which stays the job store.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
import requests

from batchvision.cli.redis_server import free_port
from batchvision.cli.runner import Service, Supervisor, cli_argv
from batchvision.client import Client
from batchvision.core.results import Failure
from batchvision.core.settings import Settings
from batchvision.core.synthetic import encode, labelled_files, render
from batchvision.server import keys
from batchvision.server.failpoints import POISON_MARKER
from batchvision.server.keys import JobKeys
from batchvision.server.queue import CLASSIFY_TASK, create_celery
from batchvision.server.store import JobStore
from batchvision.server.telemetry import Telemetry
from batchvision.testing.servers import RabbitMQServer, RedisServer

# Every test here injects a fault and waits out a recovery (visibility timeouts, restarts).
pytestmark = pytest.mark.slow

#: Run a test once per broker (the module's stack is built per broker: ``env`` needs ``broker``).
on_both_brokers = pytest.mark.parametrize(
    "broker", ["redis", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)], indirect=True, scope="module"
)
#: A test whose fault does not concern the broker: once, on the Redis stack.
on_redis = pytest.mark.parametrize("broker", ["redis"], indirect=True, scope="module")


class Env:
    """The module's private stack (``start_private_stack`` in ``conftest.py``: Redis with AOF,
    the API, workers started on demand, and with RabbitMQ as the broker a private RabbitMQ
    node) and the checks these tests share."""

    def __init__(
        self, stack: Any, wait_until: Callable[..., Any], wait_worker: Callable[[Settings], None]
    ) -> None:
        self.stack = stack
        self.settings: Settings = stack.settings
        self.redis: RedisServer = stack.redis
        self.rabbitmq: RabbitMQServer | None = stack.rabbitmq
        self.url: str = stack.url
        self.client: Client = stack.client
        self.store: JobStore = stack.store
        self.worker: Callable[..., Service] = stack.worker
        self.log: Callable[[str], Path] = stack.log
        self.stop_workers: Callable[[], None] = stack.stop_workers
        self.wait_until = wait_until
        self.wait_worker = wait_worker

    @property
    def workers(self) -> list[Service]:
        workers: list[Service] = self.stack.workers
        return workers

    def servers(self) -> list[tuple[RedisServer | RabbitMQServer, str]]:
        """The servers the stack depends on, the broker first, each with the ``/readyz`` error
        code its outage gives."""
        out: list[tuple[RedisServer | RabbitMQServer, str]] = []
        if self.rabbitmq is not None:
            out.append((self.rabbitmq, "broker_unreachable"))
        return [*out, (self.redis, "redis_unreachable")]

    def wait_progress(self, job_id: str, at_least: int, timeout: float = 60) -> None:
        self.wait_until(
            lambda: self.client.status(job_id).done >= at_least,
            timeout=timeout,
            interval=0.02,
            message=f"{at_least} images of the job classified",
        )

    def assert_exactly_once(self, job_id: str, n: int) -> None:
        """Every image of the job has one stored result, a classification (no image of these
        jobs is bad: an error result would be a loss dressed up as an answer)."""
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
        assert (status.total, status.done, status.failed) == (n, n, 0), status
        rows = self.client.results(job_id)
        assert [r.index for r in rows] == list(range(n))
        assert [r.status for r in rows] == ["ok"] * n, [r.error for r in rows if r.error is not None]
        assert self.store.redis.hlen(JobKeys.of(job_id).results) == n
        assert Telemetry(self.store.redis).pending_images() == 0


@pytest.fixture(scope="module")
def env(
    broker: str,
    start_private_stack: Callable[..., Any],
    wait_worker: Callable[[Settings], None],
    wait_until: Callable[..., Any],
) -> Env:
    stack = start_private_stack(
        f"reliability-{broker}",
        broker=broker,
        visibility_timeout_s=6,
        task_time_limit_s=5,
        max_attempts=2,
        chunk_size=8,
        result_ttl_s=600,
    )
    return Env(stack, wait_until, wait_worker)


@pytest.fixture(autouse=True)
def _no_leftover_workers(env: Env) -> Iterator[None]:
    # A worker left running by a failed test would steal the next test's tasks.
    yield
    env.stop_workers()


def _files(n: int, seed: int) -> list[tuple[str, bytes]]:
    return [(name, data) for name, data, _ in labelled_files(n, seed=seed)]


@on_both_brokers
def test_kill_9_mid_batch_loses_nothing_and_doubles_nothing(env: Env) -> None:
    victim = env.worker(failpoints="slow-batch=0.4")
    job = env.client.submit_files(_files(96, seed=1))
    env.wait_progress(job.job_id, 8)
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    done_at_kill = env.client.status(job.job_id).done
    assert done_at_kill < 96  # really mid-job
    env.workers.remove(victim)
    env.worker()  # a fresh worker takes over after the visibility timeout
    env.assert_exactly_once(job.job_id, 96)
    env.stop_workers()


@on_redis
def test_kill_9_on_the_redis_broker_is_recovered_in_heartbeats_not_the_visibility_timeout(
    env: Env,
) -> None:
    # Kombu would give the dead worker's messages back after an hour: the chunks it was running
    # come back because its liveness key lapsed (three beats of 0.5 s).
    hour = {"BATCHVISION_VISIBILITY_TIMEOUT_S": "3600", "BATCHVISION_WORKER_HEARTBEAT_S": "0.5"}

    def worker(failpoints: str = "") -> Service:
        # Ready by its log: a ping from here is a consumer with the module's 6 s visibility
        # timeout, and kombu's restore in it would give the messages back itself.
        svc = env.worker(failpoints=failpoints, wait=False, **hour)
        env.stack.wait_ready(svc)
        return svc

    victim = worker("slow-batch=0.4")
    job = env.client.submit_files(_files(96, seed=3))
    env.wait_progress(job.job_id, 8)
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    assert env.client.status(job.job_id).done < 96  # really mid-job
    env.workers.remove(victim)
    worker()
    env.assert_exactly_once(job.job_id, 96)  # within its 120 s, not the hour
    # (The ledger entries go just after the results that finish the job.)
    env.wait_until(lambda: env.store.redis.hlen(keys.CHUNK_TAKERS) == 0, message="no chunk has a taker")
    env.stop_workers()


@on_redis
def test_a_retry_held_until_its_time_by_a_killed_worker_is_sent_again_in_heartbeats(env: Env) -> None:
    # A task's retry due later waits in the worker that took it, unacknowledged: killed, that
    # worker would hold it for the visibility timeout (an hour) but for its liveness key.
    hour = {"BATCHVISION_VISIBILITY_TIMEOUT_S": "3600", "BATCHVISION_WORKER_HEARTBEAT_S": "0.5"}
    r = env.store.redis
    job = env.client.submit_files(_files(16, seed=4))  # no worker yet: its messages wait
    due_later = create_celery(env.settings)
    retries = 0
    for key in list(r.scan_iter()):
        if r.type(key) != b"list":
            continue
        for raw in r.lrange(key, 0, -1):
            message = json.loads(raw)  # (the batch log's entries are JSON too)
            if not isinstance(message, dict) or message.get("headers", {}).get("task") != CLASSIFY_TASK:
                continue
            args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
            queue = message["properties"]["delivery_info"]["routing_key"]
            # As a retry with a countdown would come back.
            due_later.send_task(CLASSIFY_TASK, args=args, kwargs=kwargs, queue=queue, countdown=3600)
            retries += 1
            r.lrem(key, 1, raw)
    assert retries >= 1
    victim = env.worker(wait=False, **hour)
    env.stack.wait_ready(victim)
    chunks = r.zcard(keys.CHUNKS)
    env.wait_until(lambda: r.hlen(keys.CHUNK_TAKERS) == chunks, message="the held retries have their taker")
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    env.workers.remove(victim)
    fresh = env.worker(wait=False, **hour)
    env.stack.wait_ready(fresh)
    env.assert_exactly_once(job.job_id, 16)  # within its 120 s, not the hour
    env.stop_workers()


@on_both_brokers
def test_sigterm_mid_batch_finishes_or_requeues(env: Env) -> None:
    w = env.worker(failpoints="slow-batch=0.4")
    job = env.client.submit_files(_files(96, seed=2))
    env.wait_progress(job.job_id, 8)
    assert w.proc is not None
    w.proc.send_signal(signal.SIGTERM)  # a rolling deploy: warm shutdown
    assert w.proc.wait(60) == 0
    env.workers.remove(w)
    env.worker()  # whatever the stopped worker did not finish was requeued for this one
    env.assert_exactly_once(job.job_id, 96)
    env.stop_workers()


@on_both_brokers
def test_redis_restart_keeps_accepted_work_and_everyone_reconnects(env: Env) -> None:
    # Accepted while no worker runs, then Redis restarts (with RabbitMQ as the broker, RabbitMQ
    # first): the job and its queue survive (AOF; durable quorum queues).
    job = env.client.submit_files(_files(20, seed=3))
    for server, _ in env.servers():
        server.restart()
    assert env.client.status(job.job_id).total == 20  # the API reconnected by itself
    env.worker()
    env.assert_exactly_once(job.job_id, 20)
    # Restart them under a running, idle worker: it reconnects and keeps consuming.
    for server, _ in env.servers():
        server.restart()
    job2 = env.client.submit_files(_files(12, seed=4))
    env.assert_exactly_once(job2.job_id, 12)
    env.stop_workers()


@on_both_brokers
def test_redis_down_gives_503_never_202_and_recovers(env: Env) -> None:
    # Each server the stack needs goes down in turn (with RabbitMQ: the broker, then Redis).
    # Small (coalesced) and bulk submissions get 503, never 202; once the server is back
    # everything that got a 202, before, between and after the outages, completes exactly once.
    accepted = [(env.client.submit_files(_files(6, seed=5)).job_id, 6)]
    for server, code in env.servers():
        server.stop()
        try:
            for n in (2, 12):  # the interactive (coalesced) and the bulk publish paths
                resp = requests.post(
                    f"{env.url}/v1/jobs", files=[("files", f) for f in _files(n, seed=5)], timeout=30
                )
                assert resp.status_code == 503, (code, n, resp.text)
                assert resp.json()["error"]["code"] == "unavailable"
                assert resp.headers["Retry-After"]
                if code == "broker_unreachable":  # Redis is there: the job is stored, and named
                    (detail,) = resp.json()["error"]["details"]
                    assert env.store.get(detail["job_id"]) is not None, resp.text
                    assert "queues them once the broker is back" in resp.json()["error"]["message"]
            ready = requests.get(f"{env.url}/readyz", timeout=30)
            assert ready.status_code == 503 and ready.json()["error"]["code"] == code
            assert requests.get(f"{env.url}/healthz", timeout=10).status_code == 200
        finally:
            server.start()
        # The API finds the server back at its next check, not at the instant it answers.
        env.wait_until(
            lambda: requests.get(f"{env.url}/readyz", timeout=30).status_code == 200,
            timeout=60,
            interval=0.2,
            message=f"/readyz is 200 again once the server of {code!r} is back",
        )
        resp = requests.post(
            f"{env.url}/v1/jobs", files=[("files", f) for f in _files(2, seed=6)], timeout=30
        )
        assert resp.status_code == 202
        accepted.append((resp.json()["job_id"], 2))
    env.worker()
    # A request refused while RabbitMQ was down had stored its job before the publish failed:
    # the chunk ledger's sweep sends it once the queues are idle, so no image stays pending.
    env.wait_until(
        lambda: Telemetry(env.store.redis).pending_images() == 0,
        timeout=90,
        interval=0.5,
        message="no image left pending (the refused requests' chunks swept too)",
    )
    for job_id, n in accepted:
        env.assert_exactly_once(job_id, n)
    env.stop_workers()


def _poison_jpeg() -> bytes:
    import numpy as np

    img = render("circle", (120, 90), np.random.default_rng(0))
    return encode(img, "JPEG", comment=POISON_MARKER)


@on_both_brokers
def test_poison_image_ends_as_an_error_after_bounded_attempts(env: Env) -> None:
    files = _files(12, seed=6)
    files.insert(3, ("poison.jpg", _poison_jpeg()))
    # A supervisor restarts the worker each time the poison image kills it (as compose would).
    svc = Service(
        "worker",
        cli_argv("worker", "--name", f"poison@{free_port()}"),
        {**env.settings.to_env(), "BV_FAILPOINTS": "poison-kill"},
        log_path=str(env.log("worker-poison")),
    )
    sup = Supervisor([svc], max_backoff_s=1)
    sup.start()
    env.wait_worker(env.settings)
    runner = threading.Thread(target=sup.run_forever, args=(0.2,), daemon=True)
    runner.start()
    try:
        job = env.client.submit_files(files)
        status = env.client.wait(job.job_id, timeout=150, poll_s=0.5)
    finally:
        sup.stop()
    assert (status.status, status.done, status.failed) == ("partial", 12, 1)
    rows = env.client.results(job.job_id)
    assert rows[3].filename == "poison.jpg"
    assert rows[3].error.code == "poison_image"
    assert 1 <= svc.restarts <= env.settings.max_attempts  # bounded: no endless crash loop
    assert env.store.redis.hlen(JobKeys.of(job.job_id).results) == 13


@on_redis
def test_expired_job_answers_410(env: Env) -> None:
    s = env.settings.replace(result_ttl_s=1)
    store = JobStore(redis_lib.Redis.from_url(s.redis_url), result_ttl_s=1, blob_ttl_s=60)
    job_id = uuid.uuid4().hex
    store.create(job_id, model="m")
    store.add_files(job_id, [("a.jpg", "a.jpg")])
    store.record(job_id, [(0, Failure("x", "y"))])
    store.seal(job_id)  # finishes now, with a one-second result TTL
    assert requests.get(f"{env.url}/v1/jobs/{job_id}", timeout=10).status_code == 200
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/results"):
        env.wait_until(
            lambda path=path: requests.get(env.url + path, timeout=10).status_code != 200,
            timeout=30,
            interval=0.2,
            message=f"{path} stops answering 200",
        )
        resp = requests.get(env.url + path, timeout=10)
        assert resp.status_code == 410
        assert resp.json()["error"]["code"] == "job_expired"


@on_redis
def test_worker_refuses_a_visibility_timeout_below_the_time_limit(env: Env) -> None:
    bad = {
        **env.settings.to_env(),
        "BATCHVISION_VISIBILITY_TIMEOUT_S": "5",
        "BATCHVISION_TASK_TIME_LIMIT_S": "10",
    }
    proc = subprocess.run(cli_argv("worker"), env=bad, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "BATCHVISION_VISIBILITY_TIMEOUT_S=5 must be longer than" in proc.stderr


@on_redis
def test_a_worker_whose_metrics_port_is_taken_says_which_setting_to_change(env: Env) -> None:
    # Two workers on one host with the same port: the second used to exit with a traceback.
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        bad = {
            **env.settings.to_env(),
            "BATCHVISION_WORKER_METRICS_PORT": str(port),
            "BATCHVISION_WORKER_METRICS_HOST": "127.0.0.1",
        }
        proc = subprocess.run(cli_argv("worker"), env=bad, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    assert f"cannot listen on 127.0.0.1:{port}" in out and "BATCHVISION_WORKER_METRICS_PORT" in out, out[
        -3000:
    ]
    assert "Traceback" not in out, out[-3000:]


@on_redis
def test_worker_warns_when_redis_may_evict(env: Env) -> None:
    client = redis_lib.Redis.from_url(env.redis.url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        w = env.worker()
        env.wait_until(
            lambda: "maxmemory-policy is 'allkeys-lru'" in Path(w.log_path).read_text(),
            timeout=30,
            message="the worker's eviction warning",
        )
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        env.stop_workers()


@on_both_brokers
def test_pickle_message_is_rejected_and_the_worker_survives(env: Env) -> None:
    w = env.worker()
    job_id = env.client.open_job().job_id
    name, data = _files(1, seed=9)[0]
    env.store.add_files(job_id, [(name, name)])
    env.store.redis.set(keys.blob(job_id, 0), data)
    app = create_celery(env.settings)
    app.conf.accept_content = ["json", "pickle"]
    args = [[[job_id, [0]]], time.time(), False]  # a well-formed classify message ...
    app.send_task(CLASSIFY_TASK, args=args, serializer="pickle", queue=env.settings.queue)
    log = Path(w.log_path)
    env.wait_until(
        lambda: "ContentDisallowed" in log.read_text(), timeout=60, message="the worker refuses the message"
    )
    assert env.store.unresolved(job_id, [0]) == [0]  # ... that never ran
    assert w.proc is not None and w.proc.poll() is None  # the worker is unharmed
    # The same message as JSON runs: the refusal was the serializer's, not the arguments'.
    app.send_task(CLASSIFY_TASK, args=args, serializer="json", queue=env.settings.queue)
    app.close()  # its broker connections (RabbitMQ's are not closed by the GC)
    env.wait_until(lambda: not env.store.unresolved(job_id, [0]), timeout=60, message="the JSON message ran")
    assert env.store.unresolved(job_id, [0]) == []
    env.client.seal(job_id)
    assert env.client.wait(job_id, timeout=60).status == "succeeded"
    env.stop_workers()


@on_both_brokers
def test_a_task_that_fails_for_good_is_sent_again_and_its_images_classified(env: Env) -> None:
    # The task raises what it does not retry (a bug, say): its message is acknowledged (Redis)
    # or dead-lettered (RabbitMQ), and the chunk is sent again after a pause, not left for the
    # sweep of lost chunks two visibility timeouts later.
    worker = env.worker(failpoints="task-error=1")
    job = env.client.submit_files(_files(8, seed=21))
    env.assert_exactly_once(job.job_id, 8)
    log = Path(worker.log_path).read_text(errors="replace")
    assert "failpoint task-error: task 1 of 1 fails" in log
    if env.rabbitmq is None:
        assert "its task gave up (resend 1 of" in log and "its message was lost" not in log
        assert env.store.redis.zcard(keys.FAILED_CHUNKS) == 0
    else:
        assert "re-sending failed task" in log
    env.stop_workers()
