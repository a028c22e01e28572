"""The job waiter against a real redis-server: woken over pub/sub by the finishing script,
and still correct when a pub/sub message is lost."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_lib

from batchvision.core.results import Prediction
from batchvision.server.intake import new_job_id
from batchvision.server.keys import JobKeys
from batchvision.server.store import JobStore
from batchvision.server.waiter import Waiter
from batchvision.testing.servers import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client() -> Iterator[redis_lib.Redis]:
    with RedisServer() as server:
        yield redis_lib.Redis.from_url(server.url)


def one_image_job(store: JobStore) -> str:
    job_id = new_job_id()
    store.create(job_id, model="m")
    store.add_files(job_id, [("a.jpg", "a.jpg")])
    store.seal(job_id)
    return job_id


def finish(store: JobStore, job_id: str) -> None:
    store.record(job_id, [(0, Prediction("x", 0, 1.0, ()))])


def test_a_finish_wakes_the_waiter_over_pub_sub(
    client: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    store = JobStore(client, result_ttl_s=60, blob_ttl_s=60)
    # A re-check period far beyond the timeout: only the pub/sub message can end this wait.
    waiter = Waiter(client, store.is_finished, recheck_s=60.0)
    job_id = one_image_job(store)
    out: list[bool] = []
    t = threading.Thread(target=lambda: out.append(waiter.wait(job_id, timeout_s=30.0)))
    t.start()
    wait_until(lambda: waiter.waiting() == 1)
    started = time.monotonic()
    finish(store, job_id)
    t.join(30)
    assert out == [True]
    assert time.monotonic() - started < 20  # not the timeout, not a re-check
    assert waiter.waiting() == 0
    waiter.close()


def test_a_job_finished_before_the_wait_returns_at_once(client: redis_lib.Redis) -> None:
    store = JobStore(client, result_ttl_s=60, blob_ttl_s=60)
    waiter = Waiter(client, store.is_finished, recheck_s=60.0)
    job_id = one_image_job(store)
    finish(store, job_id)
    assert waiter.wait(job_id, timeout_s=30.0) is True
    waiter.close()


def test_a_job_heard_to_finish_then_running_again_is_waited_for(
    client: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    store = JobStore(client, result_ttl_s=60, blob_ttl_s=60)
    waiter = Waiter(client, store.is_finished, recheck_s=0.05)
    waiter.mark()  # the listener is subscribed
    job_id = one_image_job(store)
    finish(store, job_id)
    wait_until(lambda: job_id in waiter._recent)  # heard over pub/sub
    client.hdel(JobKeys.of(job_id).job, "finished_at")  # as a retry of the finished job does
    # A wait without a mark (a long poll of a job that exists) asks Redis, not what it heard.
    assert waiter.wait(job_id, timeout_s=0.3) is False
    waiter.close()


def test_an_unfinished_job_times_out(client: redis_lib.Redis) -> None:
    store = JobStore(client, result_ttl_s=60, blob_ttl_s=60)
    waiter = Waiter(client, store.is_finished, recheck_s=0.05)
    assert waiter.wait(one_image_job(store), timeout_s=0.3) is False
    waiter.close()


def test_a_lost_announcement_is_caught_by_the_recheck(
    client: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    store = JobStore(client, result_ttl_s=60, blob_ttl_s=60)
    waiter = Waiter(client, store.is_finished, recheck_s=0.2)
    job_id = one_image_job(store)
    out: list[bool] = []
    t = threading.Thread(target=lambda: out.append(waiter.wait(job_id, timeout_s=30.0)))
    t.start()
    wait_until(lambda: waiter.waiting() == 1)
    # A finish whose announcement never arrives (as while the listener reconnects): only the
    # periodic re-check can see it.
    client.hset(JobKeys.of(job_id).job, "finished_at", f"{time.time():.3f}")
    t.join(30)
    assert out == [True]
    waiter.close()


def test_the_listener_resubscribes_after_its_connection_is_cut(
    client: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    store = JobStore(client, result_ttl_s=60, blob_ttl_s=60)
    waiter = Waiter(client, store.is_finished, recheck_s=60.0)
    assert waiter.wait(one_image_job(store), timeout_s=0.05) is False  # starts the listener
    assert waiter.subscriptions == 1
    client.client_kill_filter(_type="pubsub")
    wait_until(lambda: waiter.subscriptions == 2)
    job_id = one_image_job(store)
    out: list[bool] = []
    t = threading.Thread(target=lambda: out.append(waiter.wait(job_id, timeout_s=30.0)))
    t.start()
    wait_until(lambda: waiter.waiting() == 1)
    finish(store, job_id)
    t.join(30)
    assert out == [True]
    waiter.close()


def test_a_wait_marked_before_the_job_existed_asks_redis_nothing(
    client: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    store = JobStore(client, result_ttl_s=60, blob_ttl_s=60)
    waiter = Waiter(client, store.is_finished, recheck_s=60.0)
    # Finished between the mark and the wait: the listener heard it.
    since = waiter.mark()
    early = one_image_job(store)
    finish(store, early)
    wait_until(lambda: early in waiter._recent)
    assert waiter.wait(early, timeout_s=30.0, since=since) is True
    # Finishing during the wait: the announcement alone ends it.
    since = waiter.mark()
    late = one_image_job(store)
    out: list[bool] = []
    t = threading.Thread(target=lambda: out.append(waiter.wait(late, timeout_s=30.0, since=since)))
    t.start()
    wait_until(lambda: waiter.waiting() == 1)
    finish(store, late)
    t.join(30)
    assert out == [True]
    assert waiter.checks == 0
    waiter.close()


def test_a_wait_marked_before_the_subscription_asks_redis(client: redis_lib.Redis) -> None:
    store = JobStore(client, result_ttl_s=60, blob_ttl_s=60)
    waiter = Waiter(client, store.is_finished, recheck_s=60.0)
    since = time.monotonic()  # before the listener subscribed: it may have missed the finish
    job_id = one_image_job(store)
    finish(store, job_id)
    assert waiter.wait(job_id, timeout_s=5.0, since=since) is True
    assert waiter.checks == 1
    waiter.close()
