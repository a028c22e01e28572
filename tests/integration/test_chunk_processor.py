"""The worker's per-message work (``batchvision.server.pipeline.ChunkProcessor``) in-process,
against a real, private redis-server: a real job store, blob store, claims and dynamic batcher
(the ``rig`` fixture of conftest.py).

The model is a plain function (the colour of an image decides its class), because the model is
not what is under test: what is, is that every image ends with exactly one stored result, the
right one, whatever the delivery (first, redelivered, isolated), the job (canceled, vanished)
or the upload (undecodable, expired).
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu.exceptions
import numpy as np
import pytest
import redis as redis_lib

from batchvision.core.batching import Places
from batchvision.core.imaging import decode_image
from batchvision.core.results import error_result
from batchvision.server import keys
from batchvision.server.blobs import FileBlobs
from batchvision.server.fetch import url_blob
from batchvision.server.keys import JobKeys
from batchvision.server.messages import Chunk
from batchvision.server.recovery import chunk_member, resend_failed
from batchvision.server.store import Counts
from batchvision.server.telemetry import Telemetry
from batchvision.testing.servers import RedisServer

INPUT = (16, 16)
MAX_ATTEMPTS = 2  # the rig's


COLOURS = ["red", "green", "blue", "red", "green"]


def test_first_delivery_classifies_the_chunk_in_one_batch(rig: Any) -> None:
    ix = rig.job("j", [rig.jpeg(c) for c in COLOURS])
    summary = rig.process(("j", ix), enqueued_at=123.0)
    assert summary == {"jobs": ["j"], "classified": 5, "failed": 0, "skipped": 0}
    assert rig.labels("j") == COLOURS  # each result is its own image's
    assert all(len(row["top_k"]) == 2 for row in rig.rows("j"))
    assert rig.model_calls() == [5]  # the reservation kept the chunk together
    assert rig.batches[0].tags == (("j", 123.0),) * 5
    assert rig.recorded == [(Counts(done=5), "colours")]
    job = rig.store.get("j")
    assert job is not None and job["status"] == "succeeded" and job["finished_at"] is not None
    assert Telemetry(rig.r).pending_images() == 0
    assert rig.blobs_left("j") == []  # uploads go once their result is stored
    assert not rig.in_ledger("j", ix)


def test_one_message_of_several_jobs_is_classified_together(rig: Any) -> None:
    a = rig.job("a", [rig.jpeg("red"), rig.jpeg("blue")])
    b = rig.job("b", [rig.jpeg("green"), rig.jpeg("green"), rig.jpeg("red")])
    summary = rig.process(("a", a), ("b", b))
    assert summary == {"jobs": ["a", "b"], "classified": 5, "failed": 0, "skipped": 0}
    assert rig.labels("a") == ["red", "blue"] and rig.labels("b") == ["green", "green", "red"]
    assert rig.model_calls() == [5]
    assert {tag[0] for tag in rig.batches[0].tags} == {"a", "b"}
    assert not rig.in_ledger("a", a) and not rig.in_ledger("b", b)


def test_a_redelivered_chunk_whose_results_are_stored_does_nothing(rig: Any) -> None:
    ix = rig.job("j", [rig.jpeg(c) for c in COLOURS])
    rig.process(("j", ix))
    before = (rig.rows("j"), rig.store.get("j"), Telemetry(rig.r).pending_images(), rig.model_calls())
    rig.blobs.put_many("j", {0: rig.jpeg("blue")})  # a re-sent upload's bytes, left behind
    summary = rig.process(("j", ix))
    assert summary == {"jobs": ["j"], "classified": 0, "failed": 0, "skipped": 5}
    after = (rig.rows("j"), rig.store.get("j"), Telemetry(rig.r).pending_images(), rig.model_calls())
    assert after == before  # nothing classified, stored or counted twice
    assert rig.recorded == [(Counts(done=5), "colours")]
    assert rig.blobs_left("j") == []  # only the cleaning up is done


def test_a_redelivered_chunk_keeps_the_uploads_of_retryable_errors_for_a_retry(rig: Any) -> None:
    # The first delivery stored every result, then died before it deleted the uploads.
    ix = rig.job("j", [rig.jpeg(c) for c in COLOURS[:3]])
    codes = ["corrupt_image", "fetch_timeout", "corrupt_image"]  # the second one is retryable
    rig.store.record("j", [(i, error_result(code, "first")) for i, code in zip(ix, codes, strict=True)])
    summary = rig.process(("j", ix))
    assert summary["skipped"] == 3 and rig.model_calls() == []
    # Only the upload a retry of the job needs is left (until the blob expires).
    assert rig.blobs_left("j") == [keys.blob("j", ix[1]).encode()]


def test_a_redelivered_chunk_is_isolated_and_a_poison_image_ends_as_an_error(rig: Any) -> None:
    ix = rig.job("j", [rig.jpeg(c) for c in COLOURS])
    # The history of a poison image at index 2: the first, whole-chunk delivery died; the
    # second, isolating images one by one, died on image 2.
    rig.claims.claim(Chunk.of("j", ix), "chunk:0")
    assert rig.claims.claim(Chunk.of("j", ix), "chunk:0") is not None
    assert rig.claims.attempt("j", "image:2") == 1
    summary = rig.process(("j", ix))  # the third delivery
    assert summary == {"jobs": ["j"], "classified": 4, "failed": 1, "skipped": 0}
    rows = rig.rows("j")
    assert rows[2]["error"]["code"] == "poison_image"
    assert f"{MAX_ATTEMPTS} times" in rows[2]["error"]["message"]
    assert [rows[i]["label"] for i in (0, 1, 3, 4)] == ["red", "green", "red", "green"]
    assert rig.model_calls() == [1, 1, 1, 1]  # one image at a time, and never the poison one
    assert Telemetry(rig.r).pending_images() == 0
    assert rig.store.get("j")["status"] == "partial"  # type: ignore[index]
    # Only the poison image's blob is left: a retry of the job may queue it again.
    assert rig.blobs_left("j") == [keys.blob("j", 2).encode()] and not rig.in_ledger("j", ix)


def test_a_second_delivery_tries_each_image_once_more(rig: Any) -> None:
    ix = rig.job("j", [rig.jpeg(c) for c in COLOURS])
    rig.claims.claim(Chunk.of("j", ix), "chunk:0")  # the first delivery died somewhere in the chunk
    summary = rig.process(("j", ix))
    assert summary["classified"] == 5  # nobody is poison yet: each had one attempt only
    assert rig.model_calls() == [1] * 5
    assert rig.labels("j") == COLOURS


def test_the_tasks_own_retries_are_not_deaths(rig: Any) -> None:
    ix = rig.job("j", [rig.jpeg(c) for c in COLOURS])
    rig.claims.claim(Chunk.of("j", ix), "chunk:0")  # that delivery hit a Redis hiccup and retried itself
    summary = rig.process(("j", ix), retries=1)
    assert summary["classified"] == 5
    assert rig.model_calls() == [5]  # the whole chunk together: no isolation


def test_an_isolating_delivery_that_meets_a_redis_error_is_no_death_of_its_image(
    rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first delivery died, so the next ones isolate; three of them in a row meet a Redis
    # error as image 0's result is stored. The process lived: no attempt is held against the
    # image (MAX_ATTEMPTS of them would end it as poison_image), and the fourth stores it.
    ix = rig.job("j", [rig.jpeg(c) for c in COLOURS])
    rig.claims.claim(Chunk.of("j", ix), "chunk:0")
    store = rig.processor._store
    failures = [redis_lib.exceptions.ConnectionError("Connection reset by peer")] * MAX_ATTEMPTS

    def flaky_store(outcomes: Any, finished: Any, stats: Any) -> None:
        if failures and any(o.results for o in outcomes):
            raise failures.pop()
        store(outcomes, finished, stats)

    monkeypatch.setattr(rig.processor, "_store", flaky_store)
    for retries in range(MAX_ATTEMPTS):
        with pytest.raises(redis_lib.exceptions.ConnectionError):
            rig.process(("j", ix), retries=retries)
        assert rig.claims.attempt("j", "image:0", 0) == 0
    summary = rig.process(("j", ix), retries=MAX_ATTEMPTS)
    assert summary["classified"] == 5 and summary["failed"] == 0, summary
    assert rig.labels("j") == COLOURS


def test_an_isolating_delivery_deletes_the_uploads_a_dead_one_left_in_a_file_store(
    scratch_redis: redis_lib.Redis, rig_on: Any, tmp_path: Path
) -> None:
    # File (and S3) blobs never expire. An isolating delivery stored image 2's result and died
    # before deleting its upload; the next one has nothing to classify for it, yet deletes it.
    rig = rig_on(scratch_redis, blobs=FileBlobs(tmp_path / "blobs"))
    ix = rig.job("j", [rig.jpeg(c) for c in COLOURS])
    rig.claims.claim(Chunk.of("j", ix), "chunk:0")
    rig.claims.claim(Chunk.of("j", ix), "chunk:0")
    rig.store.record("j", [(2, error_result("not_an_image", "stored by the delivery that died"))])
    summary = rig.process(("j", ix))
    assert summary["classified"] == 4 and summary["skipped"] == 1, summary
    assert sorted(p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()) == []
    assert not rig.in_ledger("j", ix)


def test_a_suspect_image_runs_alone_while_fresh_chunks_wait(
    scratch_redis: redis_lib.Redis, rig_on: Any, wait_until: Any
) -> None:
    # A death while a suspect is in flight is counted against it: so nothing else may be in
    # flight with it, not even a fresh chunk of another job (whose poison would be blamed on it).
    entered, go = threading.Event(), threading.Event()

    def held_model(images: list[np.ndarray]) -> list[np.ndarray]:
        if not go.is_set():
            entered.set()
            assert go.wait(30), "the test never let the model go"
        return [np.full(3, 1 / 3, np.float32) for _ in images]

    rig = rig_on(scratch_redis, model=held_model)
    suspect = rig.job("a", [rig.jpeg("red"), rig.jpeg("green")])
    rig.claims.claim(Chunk.of("a", suspect), "chunk:0")  # its first delivery died
    fresh = rig.job("b", [rig.jpeg("blue"), rig.jpeg("red")])
    done: list[dict[str, Any]] = []
    first = threading.Thread(target=lambda: done.append(rig.process(("a", suspect))), daemon=True)
    first.start()
    assert entered.wait(10), "the first suspect image in the model"
    second = threading.Thread(target=lambda: done.append(rig.process(("b", fresh))), daemon=True)
    second.start()
    wait_until(lambda: rig.processor._gate.waiting == 1, timeout=10, message="the fresh chunk waits")
    assert rig.model_calls() == []  # nothing ran beside the suspect
    go.set()
    first.join(30)
    second.join(30)
    assert len(done) == 2 and all(d["classified"] == 2 for d in done), done
    for batch in rig.batches:  # no batch held a suspect with anything else
        jobs = [tag[0] for tag in batch.tags]
        assert jobs == ["a"] or "a" not in jobs, rig.batches


def test_an_undecodable_upload_gets_its_own_error_and_the_rest_is_classified(rig: Any) -> None:
    good = rig.jpeg("red")
    garbage = b"this is a text file renamed .jpg\n"
    truncated = good[: len(good) // 3]
    ix = rig.job("j", [good, garbage, rig.jpeg("blue"), truncated])
    summary = rig.process(("j", ix))
    assert summary == {"jobs": ["j"], "classified": 2, "failed": 2, "skipped": 0}
    rows = rig.rows("j")
    assert [rows[0]["label"], rows[2]["label"]] == ["red", "blue"]
    for i, data in ((1, garbage), (3, truncated)):
        with pytest.raises(Exception) as exc:  # what the decoder says is what the row says
            decode_image(data, INPUT, max_pixels=50_000_000)
        assert rows[i]["status"] == "error"
        expected = {"code": exc.value.code, "message": exc.value.message, "retryable": False}  # type: ignore[attr-defined]
        assert rows[i]["error"] == expected
    assert rig.model_calls() == [2]
    assert rig.blobs_left("j") == []


def test_a_decoder_that_raises_the_unexpected_fails_that_image_alone(
    rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pillow meets untrusted bytes: whatever it raises is the image's error, never the
    # message's (which would fail every job of the message and count as a worker death).
    from batchvision.server import pipeline

    cursed = rig.jpeg("green")

    def decode(data: bytes, size: tuple[int, int], *, max_pixels: int) -> Any:
        if data == cursed:
            raise struct.error("unpack requires a buffer of 4 bytes")
        return decode_image(data, size, max_pixels=max_pixels)

    monkeypatch.setattr(pipeline, "decode_image", decode)
    ix = rig.job("j", [rig.jpeg("red"), cursed, rig.jpeg("blue")])
    summary = rig.process(("j", ix))
    assert summary == {"jobs": ["j"], "classified": 2, "failed": 1, "skipped": 0}
    rows = rig.rows("j")
    assert [rows[0]["label"], rows[2]["label"]] == ["red", "blue"]
    assert rows[1]["error"]["code"] == "corrupt_image"
    assert "unpack requires a buffer" in rows[1]["error"]["message"]
    assert rig.blobs_left("j") == []


def test_a_hung_model_costs_a_message_one_model_timeout_not_one_per_image(
    scratch_redis: redis_lib.Redis, rig_on: Any
) -> None:
    # The task's wait for the model has one deadline (MODEL_TIMEOUT_S), whatever the number of
    # images: one per image made a hung model hold a 16-image message for 16 timeouts, past the
    # broker's visibility timeout.
    release = threading.Event()

    def hung(images: list[Any]) -> list[Any]:
        release.wait(30)
        return [np.full(3, 1 / 3, np.float32) for _ in images]

    timeout_s = 2.0  # long against the rest of the message's work, even on a stalled machine
    rig = rig_on(scratch_redis, model=hung, model_timeout_s=timeout_s)
    ix = rig.job("j", [rig.jpeg(c) for c in ("red", "green", "blue", "red")])
    start = time.monotonic()
    try:
        summary = rig.process(("j", ix))
        took = time.monotonic() - start
    finally:
        release.set()
    assert summary["failed"] == 4
    assert {row["error"]["code"] for row in rig.rows("j")} == {"inference_timeout"}
    # One timeout and the message's own work; one timeout per image would be 4 * timeout_s.
    assert took < 3 * timeout_s


def test_a_missing_upload_is_upload_expired(rig: Any) -> None:
    ix = rig.job("j", [rig.jpeg("red"), rig.jpeg("green"), rig.jpeg("blue")])
    rig.blobs.delete_many("j", [1])  # its blob's TTL ran out before a worker got to it
    summary = rig.process(("j", ix))
    assert summary["classified"] == 2 and summary["failed"] == 1
    assert rig.labels("j") == ["red", "upload_expired", "blue"]
    assert rig.model_calls() == [2]


def test_a_lane_unloaded_while_its_images_wait_fails_them_retryably(rig: Any) -> None:
    # A pinned version can be unloaded to make room for another while a task decodes its
    # images: they end as the retryable model_busy, the message itself does not fail.
    ix = rig.job("j", [rig.jpeg(c) for c in COLOURS])
    rig.processor.lanes.served["colours"].batcher.close()
    summary = rig.process(("j", ix))
    assert summary["classified"] == 0 and summary["failed"] == 5
    assert rig.labels("j") == ["model_busy"] * 5
    assert rig.model_calls() == []


def test_a_canceled_job_gets_canceled_results_without_the_model(rig: Any) -> None:
    ix = rig.job("j", [rig.jpeg(c) for c in COLOURS])
    # The cancel flag is set and its canceled results not written yet (they race the worker).
    rig.r.hset(JobKeys.of("j").job, "cancel", 1)
    summary = rig.process(("j", ix))
    assert summary == {"jobs": ["j"], "classified": 0, "failed": 5, "skipped": 0}
    assert rig.labels("j") == ["canceled"] * 5
    assert rig.model_calls() == []
    assert rig.recorded == [(Counts(canceled=5), "colours")]
    assert rig.store.get("j")["status"] == "canceled"  # type: ignore[index]
    assert rig.blobs_left("j") == [] and not rig.in_ledger("j", ix)


def test_a_chunk_of_a_job_canceled_before_it_ran_only_cleans_up(rig: Any) -> None:
    ix = rig.job("j", [rig.jpeg(c) for c in COLOURS])
    rig.process(("j", ix[:2]))
    assert rig.store.cancel("j")
    rows = rig.rows("j")
    summary = rig.process(("j", ix[2:]))
    assert summary == {"jobs": ["j"], "classified": 0, "failed": 0, "skipped": 3}
    assert rig.rows("j") == rows and rig.model_calls() == [2]
    assert rig.blobs_left("j") == []


def test_a_vanished_job_releases_its_images_from_the_counters(rig: Any) -> None:
    telemetry = Telemetry(rig.r)
    ix = rig.job("j", [rig.jpeg(c) for c in COLOURS], seal=False)
    other = rig.job("other", [rig.jpeg("red")], seal=False)  # another job's count must survive
    assert telemetry.pending_images() == 6 and telemetry.active_jobs() == 2
    rig.r.delete(*JobKeys.of("j").data())  # the abandoned upload expired before a worker came
    summary = rig.process(("j", ix))
    assert summary == {"jobs": ["j"], "classified": 0, "failed": 0, "skipped": 5}
    assert telemetry.pending_images() == 1 and telemetry.active_jobs() == 1
    assert rig.model_calls() == []
    assert rig.r.keys("*{j}*") == []  # no blobs, no delivery count, nothing brought back
    assert not rig.in_ledger("j", ix) and rig.in_ledger("other", other)


def test_a_vanished_job_releases_each_image_once(rig: Any) -> None:
    telemetry = Telemetry(rig.r)
    ix = rig.job("j", [rig.jpeg("red"), rig.jpeg("blue")], seal=False)
    rig.process(("j", ix))  # stored (and counted); the worker dies before its ack
    assert telemetry.pending_images() == 0
    rig.r.delete(*JobKeys.of("j").data())  # the abandoned upload expires
    rig.process(("j", ix))  # the redelivery
    assert telemetry.pending_images() == 0


# -- a Redis out of memory (maxmemory, noeviction) ----------------------------------------------


@pytest.fixture()
def full_redis() -> Iterator[redis_lib.Redis]:
    """A private redis-server with the shipped policy, ``noeviction``, that the test fills."""
    with RedisServer() as server:
        client = redis_lib.Redis.from_url(server.url)
        client.config_set("maxmemory-policy", "noeviction")
        yield client
        client.close()


def _fill(r: redis_lib.Redis) -> None:
    """Set maxmemory just above what Redis uses, then write until it refuses (OOM)."""
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", used + 2 * 1024 * 1024)
    pipe = r.pipeline(transaction=False)
    with pytest.raises(redis_lib.exceptions.OutOfMemoryError):
        for n in range(100_000):
            pipe.set(f"ballast:{n}", b"x" * 4096)
            if n % 100 == 99:
                pipe.execute()


def test_a_full_redis_loses_no_image_and_the_retry_stores_each_result_once(
    full_redis: redis_lib.Redis, rig_on: Any
) -> None:
    rig = rig_on(full_redis)
    ix = rig.job("j", [rig.jpeg(c) for c in COLOURS])
    _fill(full_redis)
    with pytest.raises(redis_lib.exceptions.OutOfMemoryError):
        rig.process(("j", ix))  # classified, but Redis refuses the results
    # Nothing the results would replace is gone: blobs, ledger entry, pending counter.
    assert len(rig.blobs_left("j")) == len(COLOURS)
    assert rig.in_ledger("j", ix)
    assert full_redis.hlen(JobKeys.of("j").results) == 0
    assert Telemetry(full_redis).pending_images() == len(COLOURS)
    assert rig.recorded == []
    full_redis.delete(*full_redis.keys("ballast:*"))  # memory freed (the operator, or TTLs)
    summary = rig.process(("j", ix), retries=1)  # Celery's retry of the task
    assert summary["classified"] == len(COLOURS)
    assert rig.labels("j") == COLOURS  # exactly one result per image, each its own
    assert full_redis.hlen(JobKeys.of("j").results) == len(COLOURS)
    job = rig.store.get("j")
    assert job is not None and job["status"] == "succeeded" and job["done"] == len(COLOURS)
    assert Telemetry(full_redis).pending_images() == 0
    assert rig.blobs_left("j") == [] and not rig.in_ledger("j", ix)


def test_a_full_redis_still_deletes_jobs_and_releases_expired_uploads(
    full_redis: redis_lib.Redis, rig_on: Any
) -> None:
    # Deleting and releasing are how a full Redis gets memory back: a script that first tried
    # to raise or lower a counter would be refused (noeviction) before it deleted anything.
    rig = rig_on(full_redis)
    rig.job("j", [rig.jpeg(c) for c in COLOURS])
    rig.job("gone", [rig.jpeg("red"), rig.jpeg("blue")], seal=False)
    full_redis.delete(*JobKeys.of("gone").data())  # the open upload expired ...
    full_redis.zadd(keys.ACTIVE, {"gone": 0}, xx=True)  # ... its expiry time long past
    telemetry = Telemetry(full_redis)
    _fill(full_redis)
    assert telemetry.pending_images() == len(COLOURS)  # the expired upload released
    assert full_redis.zscore(keys.ACTIVE, "gone") is None
    assert rig.store.remove("j", "") is True
    assert telemetry.pending_images() == 0 and rig.store.get("j") is None


class HeldFetcher:
    """A fetcher whose URLs answer (with a red JPEG) only once ``release`` is set."""

    max_bytes = 10_000_000

    def __init__(self, image: bytes) -> None:
        self.image = image
        self.release = threading.Event()
        self.started = 0
        self.lock = threading.Lock()

    def fetch(self, url: str) -> bytes:
        with self.lock:
            self.started += 1
        assert self.release.wait(30)
        return self.image

    def close(self) -> None:
        self.release.set()


def _fetching_rig(rig: Any, colour: str) -> tuple[Any, HeldFetcher]:
    """``rig`` with a :class:`HeldFetcher` whose URLs answer an image of ``colour``."""
    fetcher = HeldFetcher(rig.jpeg(colour))
    rig.processor.fetcher = fetcher
    return rig, fetcher


def _statuses(rig: Any, job_id: str) -> list[str]:
    return [row["status"] for row in rig.rows(job_id)]


def _url_job(rig: Any, job_id: str, owner: str, n: int) -> list[int]:
    ix = rig.job(job_id, [url_blob(f"http://images.example/{job_id}/{i}.jpg") for i in range(n)])
    rig.r.hset(JobKeys.of(job_id).job, "owner", owner)
    return ix


def test_a_keys_url_chunks_beyond_its_share_are_parked_then_sent_back(
    rig_on: Any, scratch_redis: Any, wait_until: Any
) -> None:
    # fetch_per_key=1: key a's second chunk of URLs is parked (no task thread held while its
    # fetches would wait for a's turn), and published again when a's first chunk is done.
    rig, fetcher = _fetching_rig(rig_on(scratch_redis, fetch_per_key=1), "red")
    first, second = _url_job(rig, "a1", "a", 2), _url_job(rig, "a2", "a", 2)
    other = _url_job(rig, "b1", "b", 1)
    running = threading.Thread(target=rig.process, args=(("a1", first),))
    running.start()
    try:
        wait_until(lambda: fetcher.started >= 1, timeout=10, message="the fetches started")
        assert rig.process(("a2", second)) == {"jobs": ["a2"], "classified": 0, "failed": 0, "skipped": 0}
        assert rig.processor.parked() == 1 and rig.handed == []
        # a parked chunk was no delivery, and it stays in the ledger (the sweep's safety net)
        assert rig.r.hget(JobKeys.of("a2").tries, "chunk:0") in (None, b"0")
        assert rig.in_ledger("a2", second) and _statuses(rig, "a2") == ["pending"] * 2
        # another key is not parked
        fetcher.release.set()
        assert rig.process(("b1", other))["classified"] == 1
    finally:
        fetcher.release.set()
        running.join(30)
    assert rig.labels("a1") == ["red", "red"]
    assert [(c, urgent) for c, _, urgent in rig.handed] == [(Chunk.of("a2", second), False)]
    assert rig.processor.parked() == 0
    # delivered again, with a's first chunk done: it runs
    assert rig.process(("a2", second))["classified"] == 2
    assert rig.labels("a2") == ["red", "red"] and not rig.in_ledger("a2", second)


def test_urls_being_fetched_hold_no_admission_place(rig_on: Any, scratch_redis: Any, wait_until: Any) -> None:
    # Four places: a message of four URLs whose servers hang must not keep an upload out.
    rig, fetcher = _fetching_rig(rig_on(scratch_redis, max_inflight_images=4), "blue")
    urls = _url_job(rig, "u", "", 4)
    uploads = rig.job("up", [rig.jpeg(c) for c in COLOURS[:4]])
    waiting = threading.Thread(target=rig.process, args=(("u", urls),))
    waiting.start()
    try:
        wait_until(lambda: fetcher.started >= 4, timeout=10, message="the fetches started")
        done: list[dict[str, Any]] = []
        upload = threading.Thread(target=lambda: done.append(rig.process(("up", uploads))))
        upload.start()
        upload.join(15)  # (the fetches hang for 30 s: an upload waiting for a place takes that long)
        assert done and done[0]["classified"] == 4, "the uploads waited for the URLs' places"
        assert rig.labels("up") == COLOURS[:4] and _statuses(rig, "u") == ["pending"] * 4
    finally:
        fetcher.release.set()
        waiting.join(30)
    assert rig.labels("u") == ["blue"] * 4
    assert rig.processor._admission.held == 0


def test_a_stopping_worker_sends_its_parked_chunks_back_to_their_queue(
    rig_on: Any, scratch_redis: Any, wait_until: Any
) -> None:
    rig, fetcher = _fetching_rig(rig_on(scratch_redis, fetch_per_key=1), "red")
    first, second = _url_job(rig, "a1", "a", 1), _url_job(rig, "a2", "a", 1)

    def run_first() -> None:
        with contextlib.suppress(RuntimeError):  # its decode meets the pool closed under it
            rig.process(("a1", first), urgent=True)

    running = threading.Thread(target=run_first)
    running.start()
    try:
        wait_until(lambda: fetcher.started >= 1, timeout=10, message="the fetches started")
        rig.process(("a2", second), urgent=True, enqueued_at=1234.5)
        assert rig.processor.parked() == 1
        rig.processor.close()
        # published again as it came (interactive), not left for the sweep
        assert [(c, model, urgent) for c, model, urgent in rig.handed] == [
            (Chunk.of("a2", second), "colours", True)
        ]
        assert rig.handed_at == [1234.5]  # its queue wait counts from its job's upload
        assert rig.processor.parked() == 0
    finally:
        fetcher.release.set()
        running.join(30)


def test_a_parked_chunk_the_broker_refuses_again_is_marked_to_be_sent_after_a_pause(
    rig_on: Any, scratch_redis: Any, wait_until: Any
) -> None:
    # The broker away as the parked chunk goes back (a short RabbitMQ outage): it used to wait
    # for the sweep, two visibility timeouts (hours by default).
    rig, fetcher = _fetching_rig(rig_on(scratch_redis, fetch_per_key=1), "red")
    first, second = _url_job(rig, "a1", "a", 1), _url_job(rig, "a2", "a", 1)

    def broker_away(*_: Any) -> None:
        raise kombu.exceptions.OperationalError("[Errno 111] Connection refused")

    rig.processor.hand_on = broker_away
    running = threading.Thread(target=rig.process, args=(("a1", first),))
    running.start()
    try:
        wait_until(lambda: fetcher.started >= 1, timeout=10, message="the fetches started")
        rig.process(("a2", second))
        assert rig.processor.parked() == 1
    finally:
        fetcher.release.set()
        running.join(30)
    assert rig.processor.parked() == 0  # a1 done: a2 went back, and the broker refused it
    due = rig.r.zscore(keys.FAILED_CHUNKS, chunk_member(Chunk.of("a2", second)))
    assert due is not None and due - time.time() < 60, "marked to be sent again after a pause"
    assert resend_failed(rig.store, lambda c: None, lambda c, n: None, now=due + 1) == 1


def test_a_message_whose_one_chunk_is_parked_classifies_its_others(
    rig_on: Any, scratch_redis: Any, wait_until: Any
) -> None:
    rig, fetcher = _fetching_rig(rig_on(scratch_redis, fetch_per_key=1), "red")
    first, second = _url_job(rig, "a1", "a", 2), _url_job(rig, "a2", "a", 2)
    uploads = rig.job("up", [rig.jpeg(c) for c in COLOURS])
    other_key = _url_job(rig, "b1", "b", 1)
    running = threading.Thread(target=rig.process, args=(("a1", first),))
    running.start()
    try:
        wait_until(lambda: fetcher.started >= 1, timeout=10, message="a's first chunk fetches")
        done: list[dict[str, Any]] = []
        both = threading.Thread(
            target=lambda: done.append(rig.process(("up", uploads), ("a2", second), ("b1", other_key)))
        )
        both.start()
        wait_until(lambda: fetcher.started >= 2, timeout=10, message="b's URL fetch")
        fetcher.release.set()
        both.join(30)
        assert done and done[0]["classified"] == 6, done  # a2's two images wait parked
        assert rig.labels("up") == COLOURS and rig.labels("b1") == ["red"]
    finally:
        fetcher.release.set()
        running.join(30)
    assert _statuses(rig, "a2") == ["pending"] * 2 and rig.in_ledger("a2", second)
    assert not rig.in_ledger("up", uploads) and not rig.in_ledger("b1", other_key)
    assert [c for c, _, _ in rig.handed] == [Chunk.of("a2", second)]


def test_a_fetched_url_waits_for_a_place_in_line(
    rig_on: Any, scratch_redis: Any, wait_until: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One place: an upload holds it in the model, so a URL fetched meanwhile waits for it
    # before it is decoded (without taking one, it would join the model's next batch at once).
    monkeypatch.setattr(Places, "TAKE_WAIT_S", 60.0)
    entered, go = threading.Event(), threading.Event()

    def held_model(images: list[np.ndarray]) -> list[np.ndarray]:
        entered.set()
        assert go.wait(30), "the test never let the model go"
        return [np.full(3, 1 / 3, np.float32) for _ in images]

    rig, fetcher = _fetching_rig(rig_on(scratch_redis, model=held_model, max_inflight_images=1), "blue")
    urls, upload = _url_job(rig, "u", "", 1), rig.job("up", [rig.jpeg("red")])
    threads = [
        threading.Thread(target=rig.process, args=(("u", urls),)),  # lends its place while it fetches
        threading.Thread(target=rig.process, args=(("up", upload),)),
    ]
    threads[0].start()
    wait_until(lambda: fetcher.started == 1, timeout=10, message="the URL is fetched")
    threads[1].start()
    assert entered.wait(10), "the upload in the model"
    fetcher.release.set()
    admission = rig.processor._admission
    wait_until(lambda: admission.waiting() == (0, 1), timeout=10, message="the fetched image waits in line")
    assert len(rig.batches) == 0 and admission.held == 1
    go.set()
    for t in threads:
        t.join(30)
    assert [len(rig.rows(j)[0]["top_k"]) for j in ("up", "u")] == [2, 2]  # both classified
    assert rig.model_calls() == [1, 1] and admission.held == 0


def test_the_chunks_of_one_key_in_one_message_run_together(
    rig_on: Any, scratch_redis: Any, wait_until: Any
) -> None:
    # They share one task thread: the share counts messages, so small URL jobs sent together
    # are not split up; the key's next message, over its share, is parked whole.
    rig, fetcher = _fetching_rig(rig_on(scratch_redis, fetch_per_key=1), "red")
    jobs = {f"a{n}": _url_job(rig, f"a{n}", "a", 1) for n in range(4)}
    together = threading.Thread(target=rig.process, args=(("a0", jobs["a0"]), ("a1", jobs["a1"])))
    together.start()
    try:
        wait_until(lambda: fetcher.started >= 1, timeout=10, message="the first message fetches")
        summary = rig.process(("a2", jobs["a2"]), ("a3", jobs["a3"]))
        assert summary["classified"] == 0 and rig.processor.parked() == 2
    finally:
        fetcher.release.set()
        together.join(30)
    assert rig.labels("a0") == ["red"] and rig.labels("a1") == ["red"]
    assert sorted(c.job_id for c, _, _ in rig.handed) == ["a2", "a3"]  # none left running: both back


def test_a_message_that_fails_parks_nothing_and_its_retry_runs_every_chunk(
    rig_on: Any, scratch_redis: Any, wait_until: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its retry carries all of its chunks: one parked (or sent back) meanwhile would run twice,
    # the second time as a suspect (its delivery of the failed try still counted).
    rig, fetcher = _fetching_rig(rig_on(scratch_redis, fetch_per_key=1), "red")
    first, second = _url_job(rig, "a1", "a", 1), _url_job(rig, "a2", "a", 1)
    uploads = rig.job("up", [rig.jpeg("green")])
    store = rig.processor._store
    failures = [redis_lib.exceptions.ConnectionError("Connection reset by peer")]

    def flaky_store(outcomes: Any, finished: Any, stats: Any) -> None:
        if failures and any(o.chunk.job_id == "up" for o in outcomes):
            raise failures.pop()
        store(outcomes, finished, stats)

    monkeypatch.setattr(rig.processor, "_store", flaky_store)
    running = threading.Thread(target=rig.process, args=(("a1", first),))
    running.start()
    try:
        wait_until(lambda: fetcher.started >= 1, timeout=10, message="a's first message fetches")
        with pytest.raises(redis_lib.exceptions.ConnectionError):
            rig.process(("up", uploads), ("a2", second))
        assert rig.processor.parked() == 0 and rig.handed == []
        assert rig.r.hget(JobKeys.of("a2").tries, "chunk:0") == b"0"  # set aside: no delivery
        # the retry (a's share still full) runs a2 instead of setting it aside again
        fetcher.release.set()
        assert rig.process(("up", uploads), ("a2", second), retries=1)["classified"] == 2
    finally:
        fetcher.release.set()
        running.join(30)
    assert rig.labels("a2") == ["red"] and rig.labels("up") == ["green"]
    assert rig.handed == [] and rig.processor.parked() == 0


def test_parked_chunks_are_stamped_anew_so_no_sweep_sends_them_again(
    rig_on: Any, scratch_redis: Any, wait_until: Any
) -> None:
    rig, fetcher = _fetching_rig(rig_on(scratch_redis, fetch_per_key=1), "red")
    first, second = _url_job(rig, "a1", "a", 1), _url_job(rig, "a2", "a", 1)
    running = threading.Thread(target=rig.process, args=(("a1", first),))
    running.start()
    try:
        wait_until(lambda: fetcher.started >= 1, timeout=10, message="a's first message fetches")
        rig.process(("a2", second))
        member = chunk_member(Chunk.of("a2", second))
        rig.r.zadd(keys.CHUNKS, {member: 1.0}, xx=True)  # as if it had waited for hours
        rig.processor.touch_parked()
        assert time.time() - 60 < float(rig.r.zscore(keys.CHUNKS, member) or 0) <= time.time()
    finally:
        fetcher.release.set()
        running.join(30)


def test_the_worker_running_a_chunk_is_its_taker_until_it_is_done_or_sent_on(
    rig_on: Any, scratch_redis: Any, wait_until: Any
) -> None:
    # Redis broker: a chunk records the worker that runs it, so that it is sent again soon
    # should that worker die (batchvision/server/liveness.py).
    rig, fetcher = _fetching_rig(rig_on(scratch_redis, fetch_per_key=1), "red")
    rig.processor.taker = "w"
    first, second = _url_job(rig, "a1", "a", 1), _url_job(rig, "a2", "a", 1)

    def taker(job_id: str, indexes: list[int]) -> Any:
        return rig.r.hget(keys.CHUNK_TAKERS, chunk_member(Chunk.of(job_id, indexes)))

    running = threading.Thread(target=rig.process, args=(("a1", first),))
    running.start()
    try:
        wait_until(lambda: fetcher.started >= 1, timeout=10, message="the fetches started")
        assert taker("a1", first) == b"w"  # recorded by its claim
        rig.process(("a2", second))
        assert rig.processor.parked() == 1 and taker("a2", second) == b"w"  # parked here: its own
        rig.processor.release_parked()
        assert [c for c, _, _ in rig.handed] == [Chunk.of("a2", second)]
        assert taker("a2", second) is None  # back in its queue: whoever takes it next
    finally:
        fetcher.release.set()
        running.join(30)
    assert rig.labels("a1") == ["red"]
    assert rig.r.hlen(keys.CHUNK_TAKERS) == 0  # done: forgotten with its ledger entry
