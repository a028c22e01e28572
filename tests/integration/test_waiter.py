"""The job waiter against a real redis-server: woken over pub/sub by the finishing script,
and still correct when a pub/sub message is lost."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_lib

from batchvision.core.results import Failure, ImageResult, Prediction, TopScore
from batchvision.server import waiter as waiter_module
from batchvision.server.intake import new_job_id
from batchvision.server.keys import JobKeys
from batchvision.server.store import REPLY_MAX_ROWS, JobStore
from batchvision.server.waiter import Finished, Waiter
from batchvision.testing.servers import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client() -> Iterator[redis_lib.Redis]:
    with RedisServer() as server:
        yield redis_lib.Redis.from_url(server.url)


Rig = Callable[[float], tuple[JobStore, Waiter]]


@pytest.fixture()
def rig(client: redis_lib.Redis) -> Iterator[Rig]:
    """``rig(recheck_s)``: a job store and a waiter with that re-check period (its listener
    stopped after the test)."""
    store = JobStore(client, result_ttl_s=60, blob_ttl_s=60)
    waiters: list[Waiter] = []

    def make(recheck_s: float) -> tuple[JobStore, Waiter]:
        waiters.append(Waiter(client, store.is_finished, recheck_s=recheck_s))
        return store, waiters[-1]

    yield make
    for waiter in waiters:
        waiter.close()


def one_image_job(store: JobStore) -> str:
    job_id = new_job_id()
    store.create(job_id, model="m")
    store.add_files(job_id, [("a.jpg", "a.jpg")])
    store.seal(job_id)
    return job_id


def finish(store: JobStore, job_id: str) -> None:
    store.record(job_id, [(0, Prediction("x", 0, 1.0, ()))])


def test_a_finish_wakes_the_waiter_over_pub_sub(rig: Rig, wait_until: Callable[..., Any]) -> None:
    # A re-check period far beyond the timeout: only the pub/sub message can end this wait.
    store, waiter = rig(60.0)
    job_id = one_image_job(store)
    out: list[Finished | None] = []
    t = threading.Thread(target=lambda: out.append(waiter.wait(job_id, timeout_s=30.0)))
    t.start()
    wait_until(lambda: waiter.waiting() == 1)
    started = time.monotonic()
    finish(store, job_id)
    t.join(30)
    assert out == [Finished()]
    assert time.monotonic() - started < 20  # not the timeout, not a re-check
    assert waiter.waiting() == 0


def test_a_job_finished_before_the_wait_returns_at_once(rig: Rig) -> None:
    store, waiter = rig(60.0)
    job_id = one_image_job(store)
    finish(store, job_id)
    assert waiter.wait(job_id, timeout_s=30.0) == Finished()


def test_a_job_heard_to_finish_then_running_again_is_waited_for(
    rig: Rig, client: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    store, waiter = rig(0.05)
    waiter.mark()  # the listener is subscribed
    job_id = one_image_job(store)
    finish(store, job_id)
    wait_until(lambda: job_id in waiter._recent)  # heard over pub/sub
    client.hdel(JobKeys.of(job_id).job, "finished_at")  # as a retry of the finished job does
    # A wait without a mark (a long poll of a job that exists) asks Redis, not what it heard.
    assert waiter.wait(job_id, timeout_s=0.3) is None


def test_an_unfinished_job_times_out(rig: Rig) -> None:
    store, waiter = rig(0.05)
    assert waiter.wait(one_image_job(store), timeout_s=0.3) is None


def test_a_lost_announcement_is_caught_by_the_recheck(
    rig: Rig, client: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    store, waiter = rig(0.2)
    job_id = one_image_job(store)
    out: list[Finished | None] = []
    t = threading.Thread(target=lambda: out.append(waiter.wait(job_id, timeout_s=30.0)))
    t.start()
    wait_until(lambda: waiter.waiting() == 1)
    # A finish whose announcement never arrives (as while the listener reconnects): only the
    # periodic re-check can see it.
    client.hset(JobKeys.of(job_id).job, "finished_at", f"{time.time():.3f}")
    t.join(30)
    assert out == [Finished()]


def test_the_listener_resubscribes_after_its_connection_is_cut(
    rig: Rig, client: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    store, waiter = rig(60.0)
    assert waiter.wait(one_image_job(store), timeout_s=0.05) is None  # starts the listener
    assert waiter.subscriptions == 1
    client.client_kill_filter(_type="pubsub")
    wait_until(lambda: waiter.subscriptions == 2)
    job_id = one_image_job(store)
    out: list[Finished | None] = []
    t = threading.Thread(target=lambda: out.append(waiter.wait(job_id, timeout_s=30.0)))
    t.start()
    wait_until(lambda: waiter.waiting() == 1)
    finish(store, job_id)
    t.join(30)
    assert out == [Finished()]


def test_a_wait_marked_before_the_job_existed_asks_redis_nothing(
    rig: Rig, wait_until: Callable[..., Any]
) -> None:
    store, waiter = rig(60.0)
    # Finished between the mark and the wait: the listener heard it.
    since = waiter.mark()
    early = one_image_job(store)
    finish(store, early)
    wait_until(lambda: early in waiter._recent)
    assert waiter.wait(early, timeout_s=30.0, since=since) == Finished()
    # Finishing during the wait: the announcement alone ends it.
    since = waiter.mark()
    late = one_image_job(store)
    out: list[Finished | None] = []
    t = threading.Thread(target=lambda: out.append(waiter.wait(late, timeout_s=30.0, since=since)))
    t.start()
    wait_until(lambda: waiter.waiting() == 1)
    finish(store, late)
    t.join(30)
    assert out == [Finished()]
    assert waiter.checks == 0


def test_a_wait_marked_before_the_subscription_asks_redis(rig: Rig) -> None:
    store, waiter = rig(60.0)
    since = time.monotonic()  # before the listener subscribed: it may have missed the finish
    job_id = one_image_job(store)
    finish(store, job_id)
    assert waiter.wait(job_id, timeout_s=5.0, since=since) == Finished()
    assert waiter.checks == 1


def reply_job(store: JobStore, names: list[str], reply_to: str) -> str:
    job_id = new_job_id()
    store.create(job_id, model="m", reply_to=reply_to)
    store.add_files(job_id, [(n, n) for n in names])
    store.seal(job_id)
    return job_id


def woken(
    waiters: list[Waiter], job_id: str, finishing: Callable[[], object], wait_until: Callable[..., Any]
) -> list[Finished | None]:
    """What waits (one in each of ``waiters``) that the finish's news ends return."""
    marks = [w.mark() for w in waiters]
    out: dict[int, Finished | None] = {}

    def wait(n: int) -> None:
        out[n] = waiters[n].wait(job_id, timeout_s=30.0, since=marks[n])

    threads = [threading.Thread(target=wait, args=(n,)) for n in range(len(waiters))]
    for t in threads:
        t.start()
    wait_until(lambda: all(w.waiting() == 1 for w in waiters))
    finishing()
    for t in threads:
        t.join(30)
    assert all(w.checks == 0 for w in waiters)  # the news ended each wait, not a read
    return [out[n] for n in range(len(waiters))]


def test_the_rows_come_with_the_news_to_the_waiter_named_and_only_to_it(
    rig: Rig, wait_until: Callable[..., Any]
) -> None:
    (store, mine), (_, other) = rig(60.0), rig(60.0)
    assert mine.channel != other.channel
    names = ["a.jpg", "ünï cødé.png", 'quote".jpg']
    job_id = reply_job(store, names, mine.channel)
    results: list[tuple[int, ImageResult]] = [
        (0, Prediction("cat", 3, 0.75, (TopScore("cat", 0.75), TopScore("dog", 0.25)), "m", 2)),
        (1, Failure("corrupt_image", "cannot decode image")),
        (2, Prediction("dog", 4, 0.5, ())),
    ]
    finished, elsewhere = woken([mine, other], job_id, lambda: store.record(job_id, results), wait_until)
    assert elsewhere == Finished()  # another process's wait (a long poll) hears the id alone
    assert finished is not None and finished.reply is not None
    read = store.snapshot(job_id, rows=3)
    assert read[0] is not None and read[0]["status"] == "partial"
    assert [r.filename for r in read[1]] == names
    # From the news alone: a store whose Redis is gone answers the same.
    dead = JobStore(redis_lib.Redis(port=1), result_ttl_s=60, blob_ttl_s=60)
    assert dead.snapshot(job_id, rows=3, reply=finished.reply) == read
    assert mine._replies == {}  # forgotten once nobody waits for it


def test_a_job_finished_by_its_seal_replies_too(rig: Rig, wait_until: Callable[..., Any]) -> None:
    store, waiter = rig(60.0)
    job_id = new_job_id()
    store.create(job_id, model="m", reply_to=waiter.channel)
    store.add_files(job_id, [("a.jpg", "a.jpg")])
    store.record(job_id, [(0, Prediction("x", 0, 1.0, ()))])  # the result before the seal
    [finished] = woken([waiter], job_id, lambda: store.seal(job_id), wait_until)
    assert finished is not None and finished.reply is not None
    dead = JobStore(redis_lib.Redis(port=1), result_ttl_s=60, blob_ttl_s=60)
    assert dead.snapshot(job_id, rows=1, reply=finished.reply) == store.snapshot(job_id, rows=1)


def test_a_large_job_s_news_carries_no_rows(
    rig: Rig, client: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    store, waiter = rig(60.0)
    n = REPLY_MAX_ROWS + 1
    # A request's job of more files is not created to reply...
    whole = new_job_id()
    pipe = client.pipeline()
    files = [(f"{i}", f"{i}.jpg") for i in range(n)]
    store.create_whole(
        pipe, whole, model="m", owner="", files=files, errors=[], seal=True, reply_to=waiter.channel
    )
    pipe.execute()
    assert not client.hexists(JobKeys.of(whole).job, "reply_to")
    # ... and the finish publishes no more rows (nor bytes of rows) for one that is.
    many = reply_job(store, [name for _, name in files], waiter.channel)
    results: list[tuple[int, ImageResult]] = [(i, Prediction("x", 0, 1.0, ())) for i in range(n)]
    assert woken([waiter], many, lambda: store.record(many, results), wait_until) == [Finished()]
    big = reply_job(store, ["a.jpg", "b.jpg"], waiter.channel)
    long_errors: list[tuple[int, ImageResult]] = [(i, Failure("x", "y" * 40_000)) for i in range(2)]
    assert woken([waiter], big, lambda: store.record(big, long_errors), wait_until) == [Finished()]
    fits = reply_job(store, ["a.jpg"], waiter.channel)
    [finished] = woken([waiter], fits, lambda: store.record(fits, long_errors[:1]), wait_until)
    assert finished is not None and finished.reply is not None


def test_rows_heard_before_the_wait_are_kept_for_it_a_while(
    rig: Rig, wait_until: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, waiter = rig(60.0)
    since = waiter.mark()
    early = reply_job(store, ["a.jpg"], waiter.channel)
    finish(store, early)  # before its request waits (it was busy between create and wait)
    wait_until(lambda: early in waiter._recent)
    finished = waiter.wait(early, timeout_s=30.0, since=since)
    assert finished is not None and finished.reply is not None and waiter.checks == 0
    assert waiter._replies == {}
    # Rows nobody comes to wait for (the request timed out) are forgotten.
    monkeypatch.setattr(waiter_module, "REPLY_KEEP_S", 0.0)
    orphan, later = (reply_job(store, ["a.jpg"], waiter.channel) for _ in range(2))
    finish(store, orphan)
    wait_until(lambda: orphan in waiter._replies)
    finish(store, later)
    wait_until(lambda: set(waiter._replies) == {later}, message="the orphan's rows forgotten")


@pytest.mark.parametrize(
    "reply",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'[["total", "1"], ["0"], []]',
        b"7",
        b"[1, 2, 3]",
        b'[["total"], ["a.jpg"], ["{}"]]',
        b'[{}, ["a.jpg"], ["{}"]]',
        b'[["total", "1", "done", "1", "failed", "0", "canceled", "0", "sealed", "1"], ["a"], ["{}"]]',
        b'[["total", "1", "done", "1", "failed", "0", "canceled", "0", "sealed", "1", "created_at", "1.0"],'
        b' ["a.jpg"], ["not json"]]',
    ],
    ids=[
        "not-json",
        "not-utf8",
        "two-parts",
        "too-few-rows",
        "a-number",
        "numbers",
        "odd-hash",
        "hash-object",
        "no-created-at",
        "result-not-json",
    ],
)
def test_a_reply_that_is_not_the_job_s_rows_is_read_from_redis(rig: Rig, reply: bytes) -> None:
    store, _ = rig(60.0)
    job_id = one_image_job(store)
    finish(store, job_id)
    assert store.snapshot(job_id, rows=1, reply=reply) == store.snapshot(job_id, rows=1)
