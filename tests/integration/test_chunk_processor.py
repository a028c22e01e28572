"""The worker's per-message work (``batchvision.server.pipeline.ChunkProcessor``) in-process,
against a real, private redis-server: a real job store, blob store, claims and dynamic batcher.

The model is a plain function (the colour of an image decides its class), because the model is
not what is under test: what is, is that every image ends with exactly one stored result, the
right one, whatever the delivery (first, redelivered, isolated), the job (canceled, vanished)
or the upload (undecodable, expired).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import redis as redis_lib
from PIL import Image

from batchvision.core.batching import BatchInfo, DynamicBatcher
from batchvision.core.imaging import decode_image
from batchvision.core.synthetic import encode
from batchvision.server import keys
from batchvision.server.blobs import RedisBlobs
from batchvision.server.claims import Claims
from batchvision.server.keys import JobKeys
from batchvision.server.pipeline import ChunkProcessor
from batchvision.server.recovery import chunk_member, ledger_add
from batchvision.server.store import Counts, JobStore
from batchvision.server.telemetry import Telemetry

LABELS = ("red", "green", "blue")
RGB = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}
INPUT = (16, 16)
MAX_ATTEMPTS = 2


def colour_model(images: list[np.ndarray]) -> list[np.ndarray]:
    """Class probabilities from each image's mean colour: red, green or blue."""
    out = []
    for img in images:
        means = img.reshape(-1, 3).astype(np.float64).mean(axis=0) + 1.0
        out.append((means / means.sum()).astype(np.float32))
    return out


def jpeg(colour: str) -> bytes:
    return encode(Image.new("RGB", (40, 30), RGB[colour]), "JPEG", quality=90)


@dataclass
class Rig:
    r: redis_lib.Redis
    store: JobStore
    claims: Claims
    blobs: RedisBlobs
    processor: ChunkProcessor
    batches: list[BatchInfo] = field(default_factory=list)
    recorded: list[Counts] = field(default_factory=list)

    def job(self, job_id: str, images: Sequence[bytes], seal: bool = True) -> list[int]:
        """What the API does: the job, its files, their blobs, the chunk in the ledger."""
        self.store.create(job_id, model="colours")
        indexed = self.store.add_files(job_id, [(f"{i}.jpg", f"{i}.jpg") for i in range(len(images))])
        indexes = [i for i, _ in indexed]
        self.blobs.put_many(job_id, dict(zip(indexes, images, strict=True)))
        pipe = self.r.pipeline()
        ledger_add(pipe, [(job_id, indexes)], 0.0)
        pipe.execute()
        if seal:
            self.store.seal(job_id)
        return indexes

    def rows(self, job_id: str) -> list[dict[str, Any]]:
        return list(self.store.iter_results(job_id))

    def labels(self, job_id: str) -> list[str]:
        return [row.get("label") or row["error"]["code"] for row in self.rows(job_id)]

    def blobs_left(self, job_id: str) -> list[bytes]:
        return sorted(self.r.scan_iter(match=keys.blob_pattern(job_id)))

    def in_ledger(self, job_id: str, indexes: Sequence[int]) -> bool:
        return self.r.zscore(keys.CHUNKS, chunk_member(job_id, indexes)) is not None

    def model_calls(self) -> list[int]:
        return [b.size for b in self.batches]


@pytest.fixture()
def rig(store: JobStore, scratch_redis: redis_lib.Redis) -> Iterator[Rig]:
    batches: list[BatchInfo] = []
    batcher: DynamicBatcher[np.ndarray, np.ndarray] = DynamicBatcher(
        colour_model, max_batch_size=8, max_delay_s=5.0, on_batch=batches.append
    )
    claims = Claims(scratch_redis, ttl_s=300)
    blobs = RedisBlobs(scratch_redis, ttl_s=300)
    recorded: list[Counts] = []
    processor = ChunkProcessor(
        store=store,
        claims=claims,
        blobs=blobs,
        batcher=batcher,
        labels=LABELS,
        input_size=INPUT,
        top_k=2,
        max_attempts=MAX_ATTEMPTS,
        model_timeout_s=30,
        on_recorded=recorded.append,
    )
    yield Rig(scratch_redis, store, claims, blobs, processor, batches, recorded)
    processor.close()
    batcher.close()


COLOURS = ["red", "green", "blue", "red", "green"]


def test_first_delivery_classifies_the_chunk_in_one_batch(rig: Rig) -> None:
    ix = rig.job("j", [jpeg(c) for c in COLOURS])
    summary = rig.processor.process([("j", ix)], enqueued_at=123.0)
    assert summary == {"jobs": ["j"], "classified": 5, "failed": 0, "skipped": 0}
    assert rig.labels("j") == COLOURS  # each result is its own image's
    assert all(len(row["top_k"]) == 2 for row in rig.rows("j"))
    assert rig.model_calls() == [5]  # the reservation kept the chunk together
    assert rig.batches[0].tags == (("j", 123.0),) * 5
    assert rig.recorded == [Counts(done=5)]
    job = rig.store.get("j")
    assert job is not None and job["status"] == "succeeded" and job["finished_at"] is not None
    assert Telemetry(rig.r).pending_images() == 0
    assert rig.blobs_left("j") == []  # uploads go once their result is stored
    assert not rig.in_ledger("j", ix)


def test_one_message_of_several_jobs_is_classified_together(rig: Rig) -> None:
    a = rig.job("a", [jpeg("red"), jpeg("blue")])
    b = rig.job("b", [jpeg("green"), jpeg("green"), jpeg("red")])
    summary = rig.processor.process([("a", a), ("b", b)])
    assert summary == {"jobs": ["a", "b"], "classified": 5, "failed": 0, "skipped": 0}
    assert rig.labels("a") == ["red", "blue"] and rig.labels("b") == ["green", "green", "red"]
    assert rig.model_calls() == [5]
    assert {tag[0] for tag in rig.batches[0].tags} == {"a", "b"}
    assert not rig.in_ledger("a", a) and not rig.in_ledger("b", b)


def test_a_redelivered_chunk_whose_results_are_stored_does_nothing(rig: Rig) -> None:
    ix = rig.job("j", [jpeg(c) for c in COLOURS])
    rig.processor.process([("j", ix)])
    before = (rig.rows("j"), rig.store.get("j"), Telemetry(rig.r).pending_images(), rig.model_calls())
    rig.blobs.put_many("j", {0: jpeg("blue")})  # a re-sent upload's bytes, left behind
    summary = rig.processor.process([("j", ix)])
    assert summary == {"jobs": ["j"], "classified": 0, "failed": 0, "skipped": 5}
    after = (rig.rows("j"), rig.store.get("j"), Telemetry(rig.r).pending_images(), rig.model_calls())
    assert after == before  # nothing classified, stored or counted twice
    assert rig.recorded == [Counts(done=5)]
    assert rig.blobs_left("j") == []  # only the cleaning up is done


def test_a_redelivered_chunk_is_isolated_and_a_poison_image_ends_as_an_error(rig: Rig) -> None:
    ix = rig.job("j", [jpeg(c) for c in COLOURS])
    # The history of a poison image at index 2: the first, whole-chunk delivery died; the
    # second, isolating images one by one, died on image 2.
    rig.claims.claim("j", ix, "chunk:0")
    assert rig.claims.claim("j", ix, "chunk:0") is not None
    assert rig.claims.attempt("j", "image:2") == 1
    summary = rig.processor.process([("j", ix)])  # the third delivery
    assert summary == {"jobs": ["j"], "classified": 4, "failed": 1, "skipped": 0}
    rows = rig.rows("j")
    assert rows[2]["error"]["code"] == "poison_image"
    assert f"{MAX_ATTEMPTS} times" in rows[2]["error"]["message"]
    assert [rows[i]["label"] for i in (0, 1, 3, 4)] == ["red", "green", "red", "green"]
    assert rig.model_calls() == [1, 1, 1, 1]  # one image at a time, and never the poison one
    assert Telemetry(rig.r).pending_images() == 0
    assert rig.store.get("j")["status"] == "partial"  # type: ignore[index]
    assert rig.blobs_left("j") == [] and not rig.in_ledger("j", ix)


def test_a_second_delivery_tries_each_image_once_more(rig: Rig) -> None:
    ix = rig.job("j", [jpeg(c) for c in COLOURS])
    rig.claims.claim("j", ix, "chunk:0")  # the first delivery died somewhere in the chunk
    summary = rig.processor.process([("j", ix)])
    assert summary["classified"] == 5  # nobody is poison yet: each had one attempt only
    assert rig.model_calls() == [1] * 5
    assert rig.labels("j") == COLOURS


def test_the_tasks_own_retries_are_not_deaths(rig: Rig) -> None:
    ix = rig.job("j", [jpeg(c) for c in COLOURS])
    rig.claims.claim("j", ix, "chunk:0")  # that delivery hit a Redis hiccup and retried itself
    summary = rig.processor.process([("j", ix)], retries=1)
    assert summary["classified"] == 5
    assert rig.model_calls() == [5]  # the whole chunk together: no isolation


def test_an_undecodable_upload_gets_its_own_error_and_the_rest_is_classified(rig: Rig) -> None:
    good = jpeg("red")
    garbage = b"this is a text file renamed .jpg\n"
    truncated = good[: len(good) // 3]
    ix = rig.job("j", [good, garbage, jpeg("blue"), truncated])
    summary = rig.processor.process([("j", ix)])
    assert summary == {"jobs": ["j"], "classified": 2, "failed": 2, "skipped": 0}
    rows = rig.rows("j")
    assert [rows[0]["label"], rows[2]["label"]] == ["red", "blue"]
    for i, data in ((1, garbage), (3, truncated)):
        with pytest.raises(Exception) as exc:  # what the decoder says is what the row says
            decode_image(data, INPUT, max_pixels=50_000_000)
        assert rows[i]["status"] == "error"
        assert rows[i]["error"] == {"code": exc.value.code, "message": exc.value.message}  # type: ignore[attr-defined]
    assert rig.model_calls() == [2]
    assert rig.blobs_left("j") == []


def test_a_missing_upload_is_upload_expired(rig: Rig) -> None:
    ix = rig.job("j", [jpeg("red"), jpeg("green"), jpeg("blue")])
    rig.blobs.delete_many("j", [1])  # its blob's TTL ran out before a worker got to it
    summary = rig.processor.process([("j", ix)])
    assert summary["classified"] == 2 and summary["failed"] == 1
    assert rig.labels("j") == ["red", "upload_expired", "blue"]
    assert rig.model_calls() == [2]


def test_a_canceled_job_gets_canceled_results_without_the_model(rig: Rig) -> None:
    ix = rig.job("j", [jpeg(c) for c in COLOURS])
    # The cancel flag is set and its canceled results not written yet (they race the worker).
    rig.r.hset(JobKeys.of("j").job, "cancel", 1)
    summary = rig.processor.process([("j", ix)])
    assert summary == {"jobs": ["j"], "classified": 0, "failed": 5, "skipped": 0}
    assert rig.labels("j") == ["canceled"] * 5
    assert rig.model_calls() == []
    assert rig.recorded == [Counts(canceled=5)]
    assert rig.store.get("j")["status"] == "canceled"  # type: ignore[index]
    assert rig.blobs_left("j") == [] and not rig.in_ledger("j", ix)


def test_a_chunk_of_a_job_canceled_before_it_ran_only_cleans_up(rig: Rig) -> None:
    ix = rig.job("j", [jpeg(c) for c in COLOURS])
    rig.processor.process([("j", ix[:2])])
    assert rig.store.cancel("j")
    rows = rig.rows("j")
    summary = rig.processor.process([("j", ix[2:])])
    assert summary == {"jobs": ["j"], "classified": 0, "failed": 0, "skipped": 3}
    assert rig.rows("j") == rows and rig.model_calls() == [2]
    assert rig.blobs_left("j") == []


def test_a_vanished_job_releases_its_images_from_the_counters(rig: Rig) -> None:
    telemetry = Telemetry(rig.r)
    ix = rig.job("j", [jpeg(c) for c in COLOURS], seal=False)
    other = rig.job("other", [jpeg("red")], seal=False)  # another job's count must survive
    assert telemetry.pending_images() == 6 and telemetry.active_jobs() == 2
    rig.r.delete(*JobKeys.of("j").data())  # the abandoned upload expired before a worker came
    summary = rig.processor.process([("j", ix)])
    assert summary == {"jobs": ["j"], "classified": 0, "failed": 0, "skipped": 5}
    assert telemetry.pending_images() == 1 and telemetry.active_jobs() == 1
    assert rig.model_calls() == []
    assert rig.r.keys("*{j}*") == []  # no blobs, no delivery count, nothing brought back
    assert not rig.in_ledger("j", ix) and rig.in_ledger("other", other)


def test_a_vanished_job_releases_each_image_once(rig: Rig) -> None:
    telemetry = Telemetry(rig.r)
    ix = rig.job("j", [jpeg("red"), jpeg("blue")], seal=False)
    rig.processor.process([("j", ix)])  # stored (and counted); the worker dies before its ack
    assert telemetry.pending_images() == 0
    rig.r.delete(*JobKeys.of("j").data())  # the abandoned upload expires
    rig.processor.process([("j", ix)])  # the redelivery
    assert telemetry.pending_images() == 0
