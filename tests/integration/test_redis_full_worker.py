"""Redis fills up (another tenant of the same Redis, a budget set too high) or restarts while a
worker holds a batch: the worker process lives, keeps the results it made, and stores them,
each once, as soon as there is room or Redis is back; the message is then acknowledged.

Real parts: a private ``redis-server`` (``noeviction``) that is the broker and the job store,
the API, and a worker process serving the stand-in model of ``bench/standins.py``, its batch
held at a gate (the ``batch-gate`` failpoint) while the test fills Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
import requests

from batchvision.core.synthetic import labelled_files
from batchvision.server.queue import create_celery

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGES = 8  # one chunk, one message (chunk_size 8)
UNACKED = "unacked"  # kombu's hash of the messages workers hold (Redis broker)


@pytest.fixture(scope="module")
def stack(start_sleeping_stack: Callable[..., Any]) -> Any:
    # The task may wait for room for up to half of the shorter of these: long enough for the test.
    return start_sleeping_stack("redis-full", "redis", 0.0, visibility_timeout_s=600, task_time_limit_s=300)


@pytest.fixture(autouse=True)
def _no_leftover_workers(stack: Any) -> Iterator[None]:
    yield
    stack.stop_workers()


@pytest.fixture()
def r(stack: Any) -> Iterator[redis_lib.Redis]:
    with redis_lib.Redis.from_url(stack.redis.url) as client:
        yield client
        client.config_set("maxmemory", 0)


def _fill(r: redis_lib.Redis) -> None:
    """Make Redis full: its ``maxmemory`` set below what it holds, so that it refuses every
    write that could take memory (as filled by another tenant; filling it for real leaves it
    a few kilobytes over the limit, which a client's freed buffer gives back at once)."""
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) // 2)
    with pytest.raises(redis_lib.exceptions.OutOfMemoryError):
        r.set("probe", b"x")


def _held_at_the_gate(stack: Any, gate: Path, wait_until: Callable[..., Any], seed: int) -> tuple[Any, str]:
    """A worker whose first batch waits at ``gate``, and the job of that batch."""
    worker = stack.worker(failpoints=f"batch-gate={gate}")
    files = [("files", (name, data)) for name, data, _ in labelled_files(IMAGES, seed=seed)]
    resp = requests.post(f"{stack.url}/v1/jobs", files=files, timeout=30)
    assert resp.status_code == 202, resp.text
    wait_until(lambda: Path(f"{gate}.waiting").exists(), timeout=60, message="the batch at the gate")
    return worker, str(resp.json()["job_id"])


def _finished_rows(stack: Any, job_id: str, wait_until: Callable[..., Any], message: str) -> list[Any]:
    """The result rows of ``job_id`` once it succeeded (within 2 minutes), one per image."""
    wait_until(
        lambda: (
            requests.get(f"{stack.url}/v1/jobs/{job_id}?wait=5", timeout=30).json()["status"] == "succeeded"
        ),
        timeout=120,
        message=message,
    )
    rows: list[Any] = requests.get(f"{stack.url}/v1/jobs/{job_id}/results", timeout=30).json()["results"]
    assert sorted(row["index"] for row in rows) == list(range(IMAGES))
    return rows


def test_a_redis_that_fills_while_a_worker_holds_a_batch_loses_neither_worker_nor_result(
    stack: Any, r: redis_lib.Redis, tmp_path: Path, wait_until: Callable[..., Any]
) -> None:
    gate = tmp_path / "gate"
    worker, job_id = _held_at_the_gate(stack, gate, wait_until, seed=5)
    assert r.hlen(UNACKED) == 1  # the worker holds the message
    _fill(r)
    gate.touch()  # the batch runs; Redis refuses its results

    def waits_for_room() -> bool:
        assert worker.proc is not None and worker.proc.poll() is None, worker.tail(40)
        return "Redis is out of memory" in Path(worker.log_path).read_text(errors="replace")

    wait_until(waits_for_room, timeout=60, interval=0.1, message="the task waits for room")
    job = requests.get(f"{stack.url}/v1/jobs/{job_id}", timeout=10).json()
    assert job["done"] == job["failed"] == 0 and job["status"] == "queued", job
    # Room again: the results are stored, the message acknowledged.
    r.config_set("maxmemory", 0)
    rows = _finished_rows(stack, job_id, wait_until, "the job finished")
    assert all(row["status"] == "ok" and row["label"] for row in rows), rows
    wait_until(lambda: r.hlen(UNACKED) == 0, timeout=30, message="the message acknowledged")
    assert worker.proc is not None and worker.proc.poll() is None, worker.tail(40)
    assert "Unrecoverable error" not in Path(worker.log_path).read_text(errors="replace")


def test_a_redis_restart_while_a_worker_holds_a_batch_delays_it_by_the_restart_only(
    stack: Any, r: redis_lib.Redis, tmp_path: Path, wait_until: Callable[..., Any]
) -> None:
    # The task's results cannot be stored while Redis is down, nor can Celery's retry message
    # be sent: the task used to be dropped, its chunk left to the sweep (twice the visibility
    # timeout: 20 minutes here, hours by default). It waits for Redis instead.
    gate = tmp_path / "gate"
    worker, job_id = _held_at_the_gate(stack, gate, wait_until, seed=7)
    stack.redis.stop()
    try:
        gate.touch()  # the batch runs; its results cannot be stored

        def waits_for_redis() -> bool:
            assert worker.proc is not None and worker.proc.poll() is None, worker.tail(40)
            return "Redis is unreachable" in Path(worker.log_path).read_text(errors="replace")

        wait_until(waits_for_redis, timeout=60, interval=0.1, message="the task waits for Redis")
    finally:
        stack.redis.start()
    _finished_rows(
        stack, job_id, wait_until, "the job finished once Redis was back (not after the sweep's 20 minutes)"
    )
    log_text = Path(worker.log_path).read_text(errors="replace")
    assert "reject requeue=False" not in log_text, worker.tail(40)
    # Its acknowledgement went to the connection the restart dropped: kombu would hand the
    # message out again after the visibility timeout, and a worker would find every result
    # stored. Gone here, so the tests after this one start from an empty unacked hash.
    assert r.hlen(UNACKED) <= 1
    r.delete(UNACKED, f"{UNACKED}_index")


def test_an_ack_goes_through_while_redis_is_full(stack: Any, r: redis_lib.Redis) -> None:
    # kombu acknowledges a message by deleting it from its unacked hash and index; in a MULTI,
    # which Redis refuses whole while full (even deletions), so Celery stopped the worker.
    app = create_celery(stack.settings)
    r.hset(UNACKED, "tag-1", b"[]")
    r.zadd(f"{UNACKED}_index", {"tag-1": 1.0})
    with app.connection_for_write() as conn:
        qos = conn.default_channel.qos
        assert (qos.unacked_key, qos.unacked_index_key) == (UNACKED, f"{UNACKED}_index")
        _fill(r)
        qos._remove_from_indices("tag-1").execute()
    assert not r.hexists(UNACKED, "tag-1") and r.zscore(f"{UNACKED}_index", "tag-1") is None


def test_a_message_taken_while_redis_is_full_still_runs(stack: Any, r: redis_lib.Redis) -> None:
    # kombu takes a message off its list (BRPOP: Redis allows it) and then records a copy until
    # the ack, which a full Redis refuses: the message, gone from the list, must run anyway.
    app = create_celery(stack.settings)
    with app.connection_for_write() as conn:
        queue = conn.SimpleQueue("probe-full")
        queue.put({"n": 1})
        _fill(r)
        message = queue.get(timeout=10)
        assert message.payload == {"n": 1}
        assert r.hlen(UNACKED) == 0, "no copy: Redis is full"
        message.ack()
        queue.close()


def test_an_idle_worker_outlives_a_redis_full_past_its_restore_interval(
    stack: Any, r: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    # Every few seconds kombu returns expired unacknowledged messages, under a lock Redis
    # refuses while full; a worker must wait that out, not stop.
    worker = stack.worker()
    _fill(r)

    def skipped_a_restore() -> bool:
        assert worker.proc is not None and worker.proc.poll() is None, worker.tail(40)
        return "returning expired unacknowledged messages waits" in Path(worker.log_path).read_text(
            errors="replace"
        )

    wait_until(skipped_a_restore, timeout=60, interval=0.2, message="a restore skipped while full")
    r.config_set("maxmemory", 0)
    files = [("files", (name, data)) for name, data, _ in labelled_files(2, seed=6)]
    job_id = requests.post(f"{stack.url}/v1/jobs", files=files, timeout=30).json()["job_id"]
    wait_until(
        lambda: (
            requests.get(f"{stack.url}/v1/jobs/{job_id}?wait=5", timeout=30).json()["status"] == "succeeded"
        ),
        timeout=120,
        message="the job finished",
    )
    assert worker.proc is not None and worker.proc.poll() is None


def test_a_worker_restarted_while_redis_is_full_waits_for_room_then_serves(
    stack: Any, r: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    # A worker replaced while Redis is full (a rolling update, a crash) declares its queues
    # again at start; that used to stop it ("Unrecoverable error"), so nothing would be left
    # to drain the queue once there was room again.
    stack.worker()  # its queues bound once, as on any Redis that has served workers
    stack.stop_workers()
    files = [("files", (name, data)) for name, data, _ in labelled_files(IMAGES, seed=6)]
    resp = requests.post(f"{stack.url}/v1/jobs", files=files, timeout=30)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    _fill(r)
    worker = _waiting_for_room(stack, wait_until)
    r.config_set("maxmemory", 0)
    stack.wait_ready(worker)
    wait_until(
        lambda: (
            requests.get(f"{stack.url}/v1/jobs/{job_id}?wait=5", timeout=30).json()["status"] == "succeeded"
        ),
        timeout=120,
        message="the job finished",
    )
    assert "Unrecoverable error" not in Path(worker.log_path).read_text(errors="replace")


def test_a_worker_waiting_for_room_stops_when_asked(
    stack: Any, r: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    _fill(r)
    worker = _waiting_for_room(stack, wait_until)
    assert worker.proc is not None
    worker.terminate()  # SIGTERM: Celery's warm shutdown, which only sets a flag
    assert worker.proc.wait(timeout=30) == 0, worker.tail(40)


def _waiting_for_room(stack: Any, wait_until: Callable[..., Any]) -> Any:
    """A worker started while Redis is full, once it says it waits for room."""
    worker = stack.worker(wait=False)

    def waits_for_room() -> bool:
        assert worker.proc is not None and worker.proc.poll() is None, worker.tail(40)
        return "waits for room to be bound" in Path(worker.log_path).read_text(errors="replace")

    wait_until(waits_for_room, timeout=120, interval=0.2, message="the worker waits for room")
    return worker
