"""The chunk processor with several models (issue 14), in-process against a private
redis-server: each job's images go to the lane of its model with its own options; a chunk of a
model this worker does not serve is handed on untouched (no result, no delivery counted, still
in the ledger); a pinned version that cannot be loaded is a per-image error."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import redis as redis_lib
from PIL import Image

from batchvision.core.batching import DynamicBatcher
from batchvision.core.errors import BatchvisionError
from batchvision.core.models import JobOptions
from batchvision.core.schemas import prediction
from batchvision.core.synthetic import encode
from batchvision.server import keys
from batchvision.server.blobs import RedisBlobs
from batchvision.server.claims import Claims
from batchvision.server.keys import JobKeys
from batchvision.server.pipeline import ChunkProcessor
from batchvision.server.recovery import chunk_member, ledger_add
from batchvision.server.store import Counts, JobStore

RGB = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


def mean_colour(images: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    for img in images:
        means = img.reshape(-1, 3).astype(np.float64).mean(axis=0) + 1.0
        out.append((means / means.sum()).astype(np.float32))
    return out


def jpeg(colour: str) -> bytes:
    return encode(Image.new("RGB", (40, 30), RGB[colour]), "JPEG", quality=90)


@dataclass
class Lane:
    """A model: the same colour function, under this model's own names for the classes."""

    name: str
    labels: Sequence[str]
    input_size: tuple[int, int] = (16, 16)
    batcher: DynamicBatcher[np.ndarray, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.batcher = DynamicBatcher(mean_colour, max_batch_size=8, max_delay_s=5.0)

    def result(self, output: Any, options: JobOptions) -> dict[str, Any]:
        doc = prediction(np.asarray(output), self.labels, options.top_k, options.min_score)
        return {**doc, "model": self.name, "version": 7}


@dataclass
class Lanes:
    served: dict[str, Lane]

    def lane(self, options: JobOptions) -> Lane | None:
        if options.version == 99:
            raise BatchvisionError(
                "model colours version 99 cannot be loaded", code="model_version_unavailable"
            )
        return self.served.get(options.model)


@dataclass
class Rig:
    r: redis_lib.Redis
    store: JobStore
    blobs: RedisBlobs
    processor: ChunkProcessor
    handed: list[tuple[str, list[int], str, bool]]
    recorded: list[tuple[Counts, str]]

    def job(self, job_id: str, colours: Sequence[str], options: JobOptions) -> list[int]:
        self.store.create(job_id, model=options.model, options=options.to_hash())
        indexed = self.store.add_files(job_id, [(f"{i}.jpg", f"{i}.jpg") for i in range(len(colours))])
        indexes = [i for i, _ in indexed]
        self.blobs.put_many(job_id, {i: jpeg(c) for i, c in zip(indexes, colours, strict=True)})
        pipe = self.r.pipeline()
        ledger_add(pipe, [(job_id, indexes)], 0.0)
        pipe.execute()
        self.store.seal(job_id)
        return indexes

    def rows(self, job_id: str) -> list[dict[str, Any]]:
        return list(self.store.iter_results(job_id))


@pytest.fixture()
def rig(store: JobStore, scratch_redis: redis_lib.Redis) -> Iterator[Rig]:
    lanes = Lanes({"colours": Lane("colours", ("red", "green", "blue")), "rgb": Lane("rgb", ("R", "G", "B"))})
    blobs = RedisBlobs(scratch_redis, ttl_s=300)
    handed: list[tuple[str, list[int], str, bool]] = []
    recorded: list[tuple[Counts, str]] = []
    default = lanes.served["colours"]
    processor = ChunkProcessor(
        store=store,
        claims=Claims(scratch_redis, ttl_s=300),
        blobs=blobs,
        batcher=default.batcher,
        labels=default.labels,
        input_size=default.input_size,
        top_k=3,
        model_timeout_s=30,
        lanes=lanes,
        default_model="colours",
        hand_on=lambda job, ix, model, urgent: handed.append((job, ix, model, urgent)),
        on_recorded_model=lambda counts, model: recorded.append((counts, model)),
    )
    yield Rig(scratch_redis, store, blobs, processor, handed, recorded)
    processor.close()
    for lane in lanes.served.values():
        lane.batcher.close()


def test_each_job_runs_on_its_models_lane_with_its_own_options(rig: Rig) -> None:
    a = rig.job("a", ["red", "green", "blue"], JobOptions("colours", top_k=1))
    b = rig.job("b", ["blue", "red"], JobOptions("rgb", top_k=3, min_score=0.2))
    # One message with both jobs (as coalesced interactive chunks may be).
    summary = rig.processor.process([("a", a), ("b", b)], urgent=True)
    assert summary["classified"] == 5
    rows_a, rows_b = rig.rows("a"), rig.rows("b")
    assert [r["label"] for r in rows_a] == ["red", "green", "blue"]
    assert all(len(r["top_k"]) == 1 and r["model"] == "colours" and r["version"] == 7 for r in rows_a)
    assert [r["label"] for r in rows_b] == ["B", "R"]
    assert all(r["model"] == "rgb" and all(s["score"] >= 0.2 for s in r["top_k"]) for r in rows_b)
    assert all(len(r["top_k"]) < 3 for r in rows_b), "min_score dropped the weak classes"
    assert sorted((c.done, m) for c, m in rig.recorded) == [(2, "rgb"), (3, "colours")]


def test_a_chunk_of_a_model_not_served_here_is_handed_on_untouched(rig: Rig) -> None:
    ix = rig.job("x", ["red", "green"], JobOptions("shapes"))
    summary = rig.processor.process([("x", ix)], urgent=False)
    assert summary["classified"] == 0 and rig.handed == [("x", ix, "shapes", False)]
    assert rig.rows("x")[0]["status"] == "pending", "nothing stored"
    assert rig.r.zscore(keys.CHUNKS, chunk_member("x", ix)) is not None, "still in the ledger"
    assert int(rig.r.hget(JobKeys.of("x").tries, f"chunk:{ix[0]}") or 0) == 0, "not a delivery"
    assert rig.r.exists(keys.blob("x", ix[0])), "its uploads wait for the right worker"


def test_a_pinned_version_that_cannot_load_is_a_per_image_error(rig: Rig) -> None:
    ix = rig.job("p", ["red", "blue"], JobOptions("colours", version=99))
    rig.processor.process([("p", ix)])
    rows = rig.rows("p")
    assert {r["error"]["code"] for r in rows} == {"model_version_unavailable"}
    job = rig.store.get("p")
    assert job is not None and job["status"] == "failed" and job["model_version"] == 99
