"""The job store's Lua scripts (``batchvision.server.lua``) through :class:`JobStore`, against a
real, private redis-server, in-process: indexing files, exactly-once results, finishing,
sealing, canceling, and the expiry of an abandoned upload."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_lib

from batchvision.core.results import ImageResult, Prediction, TopScore, canceled_result, decode, error_result
from batchvision.server import keys
from batchvision.server.claims import Claims
from batchvision.server.exports import DROPPED, Exporter
from batchvision.server.keys import JobKeys
from batchvision.server.leases import Lease
from batchvision.server.listing import CANCELED, Lister
from batchvision.server.listing import DROPPED as LISTING_DROPPED
from batchvision.server.messages import Chunk
from batchvision.server.store import Counts, JobStore
from batchvision.server.telemetry import Telemetry

OK = Prediction("cat", 0, 0.9, (TopScore("cat", 0.9),))
BAD = error_result("truncated", "JPEG is truncated")


def _job(store: JobStore, job_id: str, n: int) -> None:
    store.create(job_id, model="m", owner="o")
    store.add_files(job_id, [(f"dir/{i}.jpg", f"{i}.jpg") for i in range(n)])


def _raw_results(r: redis_lib.Redis, job_id: str) -> dict[int, ImageResult]:
    return {int(k): decode(v) for k, v in r.hgetall(JobKeys.of(job_id).results).items()}


def test_add_files_indexes_in_order_and_a_known_key_keeps_its_index(
    store: JobStore, scratch_redis: redis_lib.Redis
) -> None:
    store.create("j", model="m")
    assert store.add_files("j", [("a/1.jpg", "1.jpg"), ("b/1.jpg", "1.jpg")]) == [(0, True), (1, True)]
    # a re-sent part: known keys keep their index and are not new; a new key gets the next index
    assert store.add_files("j", [("b/1.jpg", "1.jpg"), ("c.jpg", "c.jpg"), ("a/1.jpg", "1.jpg")]) == [
        (1, False),
        (2, True),
        (0, False),
    ]
    assert store.add_files("j", [("d.jpg", "d.jpg"), ("d.jpg", "d.jpg")]) == [(3, True), (3, False)]
    job = store.get("j")
    assert job is not None and job["total"] == 4
    assert Telemetry(scratch_redis).pending_images() == 4  # counted once per image, not per send
    assert store.filenames("j", [0, 1, 2, 3]) == ["1.jpg", "1.jpg", "c.jpg", "d.jpg"]
    assert sorted(store.file_keys("j")) == ["a/1.jpg", "b/1.jpg", "c.jpg", "d.jpg"]


def test_add_files_to_an_unknown_job_writes_nothing(store: JobStore, scratch_redis: redis_lib.Redis) -> None:
    with pytest.raises(LookupError):
        store.add_files("nope", [("a.jpg", "a.jpg")])
    assert scratch_redis.keys("*") == []  # no half-made job, no pending count


@pytest.mark.parametrize("close", ["seal", "cancel"])
def test_add_files_to_a_sealed_or_canceled_job_is_refused(
    store: JobStore, scratch_redis: redis_lib.Redis, close: str
) -> None:
    _job(store, "j", 2)
    getattr(store, close)("j")
    pending = Telemetry(scratch_redis).pending_images()
    with pytest.raises(PermissionError):
        store.add_files("j", [("new.jpg", "new.jpg"), ("dir/0.jpg", "0.jpg")])
    job = store.get("j")
    assert job is not None and job["total"] == 2
    assert sorted(store.file_keys("j")) == ["dir/0.jpg", "dir/1.jpg"]
    assert Telemetry(scratch_redis).pending_images() == pending


def test_record_stores_and_counts_each_image_exactly_once(
    store: JobStore, scratch_redis: redis_lib.Redis
) -> None:
    telemetry = Telemetry(scratch_redis)
    _job(store, "j", 3)
    assert telemetry.pending_images() == 3
    assert store.record("j", [(0, OK)]) == Counts(done=1)
    assert telemetry.pending_images() == 2
    # A redelivery, with a different answer: the first result stays, nothing is counted twice.
    other = dataclasses.replace(OK, label="dog")
    assert store.record("j", [(0, other), (0, BAD)]) == Counts()
    assert _raw_results(scratch_redis, "j") == {0: OK}
    assert telemetry.pending_images() == 2
    # Known and new in one write: only the new one counts.
    assert store.record("j", [(0, OK), (1, BAD)]) == Counts(failed=1)
    assert store.record("j", [(1, BAD)]) == Counts()
    assert telemetry.pending_images() == 1
    job = store.get("j")
    assert job is not None and (job["done"], job["failed"], job["canceled"]) == (1, 1, 0)
    assert store.unresolved("j", range(3)) == [2]
    assert store.record("j", []) == Counts()


def test_record_for_a_vanished_job_writes_nothing(store: JobStore, scratch_redis: redis_lib.Redis) -> None:
    # A late worker must not bring back (a result hash without TTL of) an expired job.
    assert store.record("gone", [(0, OK)]) == Counts()
    assert scratch_redis.keys("*") == []


class Announcements:
    """What the job scripts published on ``bv:finished``, read up to a marker this test
    publishes itself: Redis delivers a channel's messages in order, so everything published
    before the marker has arrived when the marker does (no waiting on a quiet channel)."""

    def __init__(self, r: redis_lib.Redis, wait_until: Callable[..., Any]) -> None:
        self.redis = r
        self.wait_until = wait_until
        self.pubsub = r.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(keys.FINISHED)
        self.marks = 0

    def read(self) -> list[str]:
        self.marks += 1
        mark = f"test-marker-{self.marks}"
        self.redis.publish(keys.FINISHED, mark)
        out: list[str] = []

        def marker() -> bool:
            msg = self.pubsub.get_message(timeout=0.5)
            if msg is None:  # nothing yet, or the (ignored) subscribe confirmation
                return False
            data = msg["data"].decode()
            if data != mark:
                out.append(data)
            return data == mark

        self.wait_until(marker, timeout=10, interval=0, message="the marker arrives")
        return out


@pytest.fixture()
def announcements(scratch_redis: redis_lib.Redis, wait_until: Callable[..., Any]) -> Iterator[Announcements]:
    a = Announcements(scratch_redis, wait_until)
    yield a
    a.pubsub.close()


def _assert_finished(store: JobStore, r: redis_lib.Redis, job_id: str) -> None:
    k = JobKeys.of(job_id)
    job = store.get(job_id)
    assert job is not None and job["finished_at"] is not None
    assert store.is_finished(job_id)
    present = [key for key in k.data() if r.exists(key)]
    assert set(present) >= {k.job, k.files, k.paths, k.results}
    for key in present:
        assert 0 < r.ttl(key) <= store.result_ttl_s, key  # every data key expires with the results
    assert store.result_ttl_s < r.ttl(k.tomb) <= store.result_ttl_s + 7 * 86400  # 410 after that
    assert r.zscore(keys.ACTIVE, job_id) is None
    # Once its data is gone, the tombstone answers its owner alone: another key learns nothing.
    owner = job["owner"]
    with r.pipeline() as pipe:
        pipe.dump(k.job)
        pipe.pttl(k.job)
        dumped, ttl = pipe.execute()
    r.delete(k.job)
    assert store.is_gone(job_id, owner) and not store.is_gone(job_id, owner + "-not")
    r.restore(k.job, ttl, dumped)


def test_the_last_result_of_a_sealed_job_finishes_it_once(
    store: JobStore, scratch_redis: redis_lib.Redis, announcements: Announcements
) -> None:
    r = scratch_redis
    k = JobKeys.of("j")
    _job(store, "j", 3)
    Claims(r, ttl_s=300).claim(
        Chunk.of("j", [0, 1, 2]), "chunk:0"
    )  # a worker's delivery count (the tries hash)
    assert r.zscore(keys.ACTIVE, "j") is not None
    store.seal("j")
    for key in (k.job, k.files, k.paths):
        assert r.ttl(key) == -1, key  # a sealed job is kept until it finishes
    store.record("j", [(0, OK), (1, BAD)])
    job = store.get("j")
    assert job is not None and job["finished_at"] is None and job["status"] == "running"
    assert r.zscore(keys.ACTIVE, "j") is not None and not r.exists(k.tomb) and not store.is_finished("j")
    assert announcements.read() == []

    store.record("j", [(2, OK)])
    _assert_finished(store, r, "j")
    assert announcements.read() == ["j"]  # the waiters are woken
    finished = store.get("j")
    assert finished is not None and finished["status"] == "partial"
    # A redelivered chunk changes nothing: no second wake-up, same finish time.
    store.record("j", [(2, OK)])
    _assert_finished(store, r, "j")
    assert announcements.read() == []
    assert store.get("j") == finished


@pytest.mark.parametrize("again", ["seal", "cancel"])
def test_sealing_or_canceling_a_finished_job_again_changes_nothing(
    store: JobStore, scratch_redis: redis_lib.Redis, announcements: Announcements, again: str
) -> None:
    _job(store, "j", 2)
    store.seal("j")
    store.record("j", [(0, OK), (1, BAD)])
    finished = store.get("j")
    assert announcements.read() == ["j"]
    getattr(store, again)("j")  # a client retrying its seal, or DELETE after the job finished
    assert announcements.read() == []
    assert {k: v for k, v in (store.get("j") or {}).items() if k != "status"} == {
        k: v for k, v in (finished or {}).items() if k != "status"
    }
    _assert_finished(store, scratch_redis, "j")


def test_an_open_job_with_every_result_finishes_when_sealed(
    store: JobStore, scratch_redis: redis_lib.Redis, announcements: Announcements
) -> None:
    _job(store, "j", 2)
    store.record("j", [(0, OK), (1, OK)])
    job = store.get("j")
    # more parts may come: not finished, however complete it looks
    assert job is not None and job["finished_at"] is None and job["status"] == "running"
    assert announcements.read() == []
    store.seal("j")
    _assert_finished(store, scratch_redis, "j")
    assert announcements.read() == ["j"]
    assert store.get("j")["status"] == "succeeded"  # type: ignore[index]


def test_an_empty_sealed_job_finishes_at_once(store: JobStore, scratch_redis: redis_lib.Redis) -> None:
    store.create("j", model="m")
    store.seal("j")
    job = store.get("j")
    assert job is not None and job["finished_at"] is not None and job["total"] == 0
    assert scratch_redis.zscore(keys.ACTIVE, "j") is None


def test_cancel_gives_unresolved_images_a_canceled_result_and_keeps_the_rest(
    store: JobStore, scratch_redis: redis_lib.Redis
) -> None:
    _job(store, "j", 5)
    store.record("j", [(0, OK), (1, BAD)])
    assert store.cancel("j") is True
    results = _raw_results(scratch_redis, "j")
    assert results[0] == OK and results[1] == BAD  # results so far are kept
    assert {i: results[i] for i in (2, 3, 4)} == dict.fromkeys((2, 3, 4), canceled_result())
    job = store.get("j")
    assert job is not None and job["status"] == "canceled"
    assert (job["done"], job["failed"], job["canceled"], job["total"]) == (1, 1, 3, 5)
    assert Telemetry(scratch_redis).pending_images() == 0
    _assert_finished(store, scratch_redis, "j")
    # A worker that was mid-batch loses the race: it stores and counts nothing.
    assert store.record("j", [(3, OK)]) == Counts()
    assert store.cancel("nope") is False


def test_an_abandoned_open_upload_expires_whole(
    scratch_redis: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    r = scratch_redis
    # Open uploads live 8 s: long enough that a stalled machine still reads every TTL here.
    store = JobStore(r, result_ttl_s=600, blob_ttl_s=8)
    k = JobKeys.of("j")
    _job(store, "j", 3)
    Claims(r, ttl_s=8).claim(Chunk.of("j", [0, 1, 2]), "chunk:0")
    store.record("j", [(0, OK)])  # a worker stored a result; the client never sealed
    present = [key for key in k.data() if r.exists(key)]
    assert set(present) >= {k.job, k.files, k.paths, k.results, k.tries}
    ttls = {key: r.ttl(key) for key in present}
    assert all(0 < ttl <= 8 for ttl in ttls.values()), ttls  # nothing of it outlives the upload
    wait_until(lambda: not r.exists(*k.data()), timeout=30, message="the open upload's keys expire")
    assert store.get("j") is None and not store.exists("j")
    assert not store.is_gone("j", "")  # it never finished: 404, not 410


def test_an_expired_open_upload_leaves_the_active_jobs(
    scratch_redis: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    # Open uploads live 8 s: both are still active when counted, even on a stalled machine.
    store = JobStore(scratch_redis, result_ttl_s=600, blob_ttl_s=8)
    store.create("empty", model="m")  # opened, never given a file
    _job(store, "done", 1)
    store.record("done", [(0, OK)])  # every image classified; the client never sealed
    assert Telemetry(scratch_redis).active_jobs() == 2
    wait_until(lambda: not store.exists("empty") and not store.exists("done"), timeout=30)
    assert Telemetry(scratch_redis).active_jobs() == 0


def test_a_cancel_that_meets_a_delete_leaves_no_job_behind(
    store: JobStore, scratch_redis: redis_lib.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DELETE lands between the cancel's read of the job and its write of the flag: the write
    # must not make a job hash of one field (every route on it would then fail).
    _job(store, "j", 3)
    store.seal("j")
    read = store.redis.hmget

    def read_then_deleted(*args: Any, **kwargs: Any) -> Any:
        out = read(*args, **kwargs)
        monkeypatch.setattr(store.redis, "hmget", read)
        assert store.remove("j", "o")
        return out

    monkeypatch.setattr(store.redis, "hmget", read_then_deleted)
    assert store.cancel("j") is False
    assert not scratch_redis.exists(*JobKeys.of("j").data()) and store.get("j") is None


def test_a_job_canceled_during_its_upload_is_canceled_even_if_all_it_got_is_done(
    scratch_redis: redis_lib.Redis,
) -> None:
    store = JobStore(scratch_redis, result_ttl_s=600, blob_ttl_s=600)
    _job(store, "cut", 2)  # an upload in parts: two images so far, not sealed
    store.record("cut", [(0, OK), (1, OK)])
    assert store.cancel("cut")
    job = store.get("cut")
    assert job is not None and job["status"] == "canceled" and job["finished_at"] is not None
    with pytest.raises(PermissionError):  # the rest of the upload is refused
        store.add_files("cut", [("late.jpg", "late.jpg")])
    # A finished job is not canceled after the fact.
    _job(store, "whole", 1)
    store.record("whole", [(0, OK)])
    store.seal("whole")
    assert store.cancel("whole") and store.get("whole")["status"] == "succeeded"  # type: ignore[index]


def test_a_retried_job_leaves_the_export_set_until_its_new_end_and_a_removed_one_leaves_it(
    store: JobStore, scratch_redis: redis_lib.Redis
) -> None:
    r = scratch_redis
    job = JobKeys.of("out").job
    _job(store, "out", 2)
    r.hset(job, mapping={"out_url": "s3://b/o/", "out_state": "pending"})
    store.record("out", [(0, OK), (1, error_result("fetch_timeout", "no answer"))])
    store.seal("out")
    assert r.zscore(keys.EXPORTS, "out") is not None
    # As if the exporter had failed it: a retry makes its output pending and clears the attempt.
    r.hset(job, mapping={"out_state": "failed", "out_error": "s3_error: x", "out_attempts": "3"})
    pipe = r.pipeline(transaction=True)
    store.requeue(pipe, "out", [(1, 0)])
    assert pipe.execute() == [1]
    assert r.zscore(keys.EXPORTS, "out") is None
    assert r.hmget(job, ["out_state", "out_error", "out_attempts"]) == [b"pending", None, None]
    store.record("out", [(1, OK)])
    assert r.zscore(keys.EXPORTS, "out") is not None  # queued again at its new end
    assert store.remove("out", "o")
    assert r.zscore(keys.EXPORTS, "out") is None


def test_the_exporter_drops_a_job_that_is_not_finished_without_touching_its_output_state(
    store: JobStore, scratch_redis: redis_lib.Redis
) -> None:
    r = scratch_redis
    _job(store, "running", 1)
    r.hset(JobKeys.of("running").job, mapping={"out_url": "s3://b/o/", "out_state": "pending"})
    r.zadd(keys.EXPORTS, {"running": 5})

    def no_store() -> Any:
        raise AssertionError("an unfinished job's output must not be written")

    exporter = Exporter(r, store, no_store, ["csv"])
    assert exporter.export("running", 5) == DROPPED
    assert r.zscore(keys.EXPORTS, "running") is None
    assert r.hget(JobKeys.of("running").job, "out_state") == b"pending"
    r.zadd(keys.EXPORTS, {"vanished": 7})  # a job whose hash is gone
    assert exporter.export("vanished", 7) == DROPPED
    assert r.zscore(keys.EXPORTS, "vanished") is None and not r.exists(JobKeys.of("vanished").job)


def test_a_listing_step_records_only_under_its_own_lease_and_leaves_gone_or_canceled_jobs(
    store: JobStore, scratch_redis: redis_lib.Redis
) -> None:
    r = scratch_redis

    def no_store() -> Any:
        raise AssertionError("a job that is gone, canceled or not ours must not be listed")

    def no_add(*_: Any) -> int:
        raise AssertionError("nothing may be added")

    lister = Lister(r, store, no_store, no_add, page_size=10, max_images=100)
    _job(store, "open", 2)
    fields = {"ls_url": "s3://b/p/", "ls_after": "p/x", "ls_state": "listing", "ls_images": "2"}
    r.hset(JobKeys.of("open").job, mapping=fields)
    r.zadd(keys.LISTINGS, {"open": 50})
    # Another process holds the job now (its lease is 60, ours was 50): nothing is written.
    r.zadd(keys.LISTINGS, {"open": 60})
    store.cancel("open")
    assert lister.step(Lease(lister.leases, "open", 50)) == LISTING_DROPPED
    assert r.hget(JobKeys.of("open").job, "ls_state") == b"listing"
    assert r.zscore(keys.LISTINGS, "open") == 60
    # Under its own lease, a canceled job's listing ends as failed, with why.
    assert lister.step(Lease(lister.leases, "open", 60)) == "failed"
    assert r.hmget(JobKeys.of("open").job, ["ls_state", "ls_error"]) == [b"failed", CANCELED.encode()]
    assert r.zscore(keys.LISTINGS, "open") is None
    r.zadd(keys.LISTINGS, {"vanished": 7})  # a job whose hash is gone leaves the set
    assert lister.step(Lease(lister.leases, "vanished", 7)) == LISTING_DROPPED
    assert r.zscore(keys.LISTINGS, "vanished") is None and not r.exists(JobKeys.of("vanished").job)
