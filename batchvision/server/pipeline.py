"""The worker's per-chunk work, free of Celery and TensorFlow so it is tested on its own.

For one task (a job id and a chunk of image indexes): skip what already has a result
(redelivery), fetch the blobs in one round trip, decode each image in the calling thread
(Pillow releases the GIL, so task threads decode in parallel), hand the arrays to the shared
:class:`~batchvision.core.batching.DynamicBatcher`, and store every result in one idempotent write.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchvision.core.batching import DynamicBatcher
from batchvision.core.errors import BatchvisionError
from batchvision.core.imaging import decode_image
from batchvision.core.schemas import canceled_result, error_result, prediction
from batchvision.server import failpoints
from batchvision.server.blobs import BlobStore
from batchvision.server.claims import Claims
from batchvision.server.store import Counts, JobStore

log = logging.getLogger(__name__)


@dataclass
class ChunkStats:
    """What one chunk did, returned by the task (Flower shows it)."""

    job_id: str
    classified: int = 0
    failed: int = 0
    skipped: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "classified": self.classified,
            "failed": self.failed,
            "skipped": self.skipped,
        }


@dataclass
class ChunkProcessor:
    """Classifies chunks of a job's images through a shared batcher."""

    store: JobStore
    claims: Claims
    blobs: BlobStore
    batcher: DynamicBatcher[np.ndarray, np.ndarray]
    labels: Sequence[str]
    input_size: tuple[int, int]
    top_k: int = 5
    max_pixels: int = 50_000_000
    max_attempts: int = 3
    model_timeout_s: float = 600.0
    on_decode: Callable[[float], None] | None = None
    on_recorded: Callable[[Counts], None] | None = None
    _isolation: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def process(
        self,
        job_id: str,
        indexes: Sequence[int],
        enqueued_at: float | None = None,
        urgent: bool = False,
        retries: int = 0,
    ) -> dict[str, Any]:
        """Give every image of the chunk exactly one stored result."""
        stats = ChunkStats(job_id)
        claim = self.claims.claim(job_id, indexes, f"chunk:{indexes[0]}")
        if claim is None:
            log.warning("job %s is gone (expired or deleted); dropping %d images", job_id, len(indexes))
            self.claims.forget(job_id, len(indexes))
            self.blobs.delete_many(job_id, list(indexes))
            stats.skipped = len(indexes)
            return stats.summary()
        todo, canceled, tries = claim.todo, claim.canceled, claim.deliveries
        stats.skipped = len(indexes) - len(todo)
        if not todo:  # a redelivery, or the job was canceled: only the uploads are left to clean
            self.blobs.delete_many(job_id, list(indexes))
            return stats.summary()
        if canceled:
            self._finish(job_id, todo, {i: canceled_result() for i in todo}, stats)
            return stats.summary()
        if tries - retries <= 1:  # first delivery, or only retried by ourselves
            self._finish(job_id, todo, self._classify(job_id, todo, enqueued_at, urgent), stats)
        else:
            # A redelivered chunk: the last delivery may have died on one of these images.
            # Go one image at a time, each with its own attempt count, so a poison image ends
            # as a per-image error after max_attempts while the others complete. Suspects run
            # one at a time in this process, so a death is blamed on the image that was really
            # in flight, not on suspects of other chunks that happened to run beside it.
            log.warning("job %s chunk %d delivered %d times: isolating images", job_id, indexes[0], tries)
            for i in todo:
                with self._isolation:
                    # The first, whole-chunk delivery counts as this image's first attempt too.
                    if self.claims.attempt(job_id, f"image:{i}") + 1 > self.max_attempts:
                        message = f"the worker died processing this image {self.max_attempts} times"
                        results = {i: error_result("poison_image", message)}
                    else:
                        results = self._classify(job_id, [i], enqueued_at, urgent)
                    self._finish(job_id, [i], results, stats)
        return stats.summary()

    def _classify(
        self, job_id: str, todo: list[int], enqueued_at: float | None, urgent: bool = False
    ) -> dict[int, dict[str, Any]]:
        results: dict[int, dict[str, Any]] = {}
        futures: dict[int, Future[np.ndarray]] = {}
        blobs = self.blobs.get_many(job_id, todo)
        with self.batcher.reserve(len(todo)) as slot:
            for i, data in zip(todo, blobs, strict=True):
                if data is None:
                    results[i] = error_result("upload_expired", "the upload expired before it was classified")
                    continue
                failpoints.before_decode(data)
                start = time.perf_counter()
                try:
                    image = decode_image(data, self.input_size, max_pixels=self.max_pixels)
                except BatchvisionError as exc:
                    results[i] = error_result(exc.code, exc.message)
                    continue
                finally:
                    if self.on_decode is not None:
                        self.on_decode(time.perf_counter() - start)
                futures[i] = slot.submit(image, tag=(job_id, enqueued_at), urgent=urgent)
        for i, fut in futures.items():
            try:
                results[i] = prediction(fut.result(timeout=self.model_timeout_s), self.labels, self.top_k)
            except TimeoutError:
                results[i] = error_result("inference_timeout", "the model did not answer in time")
            except BatchvisionError as exc:
                results[i] = error_result(exc.code, exc.message)
        return results

    def _finish(
        self, job_id: str, todo: list[int], results: dict[int, dict[str, Any]], stats: ChunkStats
    ) -> None:
        counts = self.store.record(job_id, sorted(results.items()))
        self.blobs.delete_many(job_id, todo)
        stats.classified += counts.done
        stats.failed += counts.failed + counts.canceled
        if self.on_recorded is not None:
            self.on_recorded(counts)
