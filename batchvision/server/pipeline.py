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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchvision.core.batching import Admission, DynamicBatcher
from batchvision.core.errors import BatchvisionError
from batchvision.core.imaging import decode_image
from batchvision.core.schemas import canceled_result, error_result, prediction
from batchvision.server import failpoints
from batchvision.server.blobs import BlobStore
from batchvision.server.claims import Claim, Claims
from batchvision.server.recovery import ledger_done, ledger_started
from batchvision.server.store import Counts, JobStore

log = logging.getLogger(__name__)


Chunk = tuple[str, Sequence[int]]


@dataclass
class ChunkStats:
    """What one message did, returned by the task (Flower shows it)."""

    jobs: list[str]
    classified: int = 0
    failed: int = 0
    skipped: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "classified": self.classified,
            "failed": self.failed,
            "skipped": self.skipped,
        }


@dataclass
class _Outcome:
    """Results to store for one chunk, and the blobs to delete with them."""

    job_id: str
    indexes: Sequence[int]
    results: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass
class ChunkProcessor:
    """Classifies messages of chunks through a shared batcher."""

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
    max_inflight_images: int = 128
    decode_threads: int = 2
    on_decode: Callable[[float], None] | None = None
    on_recorded: Callable[[Counts], None] | None = None
    _isolation: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _admission: Admission = field(init=False, repr=False)
    _decoder: ThreadPoolExecutor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._admission = Admission(max(1, self.max_inflight_images))
        self._decoder = ThreadPoolExecutor(max(1, self.decode_threads), thread_name_prefix="decode")

    def close(self) -> None:
        self._decoder.shutdown(wait=False, cancel_futures=True)

    def process(
        self,
        chunks: Sequence[Chunk],
        enqueued_at: float | None = None,
        urgent: bool = False,
        retries: int = 0,
    ) -> dict[str, Any]:
        """Give every image of every chunk exactly one stored result."""
        with self._admission.admit(sum(len(ix) for _, ix in chunks), urgent):
            return self._process(chunks, enqueued_at, urgent, retries)

    def _process(
        self, chunks: Sequence[Chunk], enqueued_at: float | None, urgent: bool, retries: int
    ) -> dict[str, Any]:
        stats = ChunkStats(sorted({job for job, _ in chunks}))
        claims = self.claims.claim_many(chunks, also=lambda pipe: ledger_started(pipe, chunks))
        done: list[_Outcome] = []  # stored in the last round trip
        fresh: list[tuple[_Outcome, list[int]]] = []  # to classify together
        suspects: list[tuple[Chunk, list[int]]] = []
        for chunk, claim in zip(chunks, claims, strict=True):
            job_id, indexes = chunk
            if claim is None:
                log.warning("job %s is gone (expired or deleted); dropping %d images", job_id, len(indexes))
                self.claims.forget(job_id, len(indexes))
                stats.skipped += len(indexes)
                done.append(_Outcome(job_id, indexes))
                continue
            stats.skipped += len(indexes) - len(claim.todo)
            outcome = _Outcome(job_id, indexes)
            done.append(outcome)
            if not claim.todo:  # a redelivery, or the job was canceled: only the uploads are left
                continue
            if claim.canceled:
                outcome.results = {i: canceled_result() for i in claim.todo}
            elif self._first_delivery(claim, retries):
                fresh.append((outcome, claim.todo))
            else:
                done.pop()
                suspects.append((chunk, claim.todo))
                log.warning(
                    "job %s chunk %d delivered %d times: isolating images",
                    job_id,
                    indexes[0],
                    claim.deliveries,
                )
        if fresh:
            results = self._classify([(o.job_id, todo) for o, todo in fresh], enqueued_at, urgent)
            for (outcome, _), res in zip(fresh, results, strict=True):
                outcome.results = res
        isolated = [id(chunk) for chunk, _ in suspects]
        self._store(done, [c for c in chunks if id(c) not in isolated], stats)
        for chunk, todo in suspects:
            self._isolate(chunk, todo, enqueued_at, urgent, stats)
        return stats.summary()

    @staticmethod
    def _first_delivery(claim: Claim, retries: int) -> bool:
        # Our own retries (a Redis hiccup, counted by Celery) are not deaths.
        return claim.deliveries - retries <= 1

    def _isolate(
        self, chunk: Chunk, todo: list[int], enqueued_at: float | None, urgent: bool, stats: ChunkStats
    ) -> None:
        # A redelivered chunk: the last delivery may have died on one of these images. Go one
        # image at a time, each with its own attempt count, so a poison image ends as a
        # per-image error after max_attempts while the others complete. Suspects run one at a
        # time in this process, so a death is blamed on the image that was really in flight,
        # not on suspects of other chunks that happened to run beside it.
        job_id = chunk[0]
        for i in todo:
            with self._isolation:
                # The first, whole-chunk delivery counts as this image's first attempt too.
                if self.claims.attempt(job_id, f"image:{i}") + 1 > self.max_attempts:
                    message = f"the worker died processing this image {self.max_attempts} times"
                    results = {i: error_result("poison_image", message)}
                else:
                    results = self._classify([(job_id, [i])], enqueued_at, urgent)[0]
                self._store([_Outcome(job_id, [i], results)], [], stats)
        self._store([], [chunk], stats)

    def _classify(
        self, wanted: list[tuple[str, list[int]]], enqueued_at: float | None, urgent: bool
    ) -> list[dict[int, dict[str, Any]]]:
        """Decode and classify ``(job, indexes)`` pairs together; one result dict per pair."""
        results: list[dict[int, dict[str, Any]]] = [{} for _ in wanted]
        blobs = self.blobs.get_batch(wanted)
        decoded: list[tuple[int, int, Future[np.ndarray | BatchvisionError]]] = []
        for n, ((_, todo), data) in enumerate(zip(wanted, blobs, strict=True)):
            for i, blob in zip(todo, data, strict=True):
                if blob is None:
                    results[n][i] = error_result(
                        "upload_expired", "the upload expired before it was classified"
                    )
                else:
                    decoded.append((n, i, self._decoder.submit(self._decode, blob)))
        predicted: list[tuple[int, int, Future[np.ndarray]]] = []
        with self.batcher.reserve(len(decoded)) as slot:
            for n, i, fut in decoded:
                image = fut.result()
                if isinstance(image, BatchvisionError):
                    results[n][i] = error_result(image.code, image.message)
                    continue
                tag = (wanted[n][0], enqueued_at)
                predicted.append((n, i, slot.submit(image, tag=tag, urgent=urgent)))
        for n, i, out in predicted:
            try:
                results[n][i] = prediction(out.result(timeout=self.model_timeout_s), self.labels, self.top_k)
            except TimeoutError:
                results[n][i] = error_result("inference_timeout", "the model did not answer in time")
            except BatchvisionError as exc:
                results[n][i] = error_result(exc.code, exc.message)
        return results

    def _decode(self, data: bytes) -> np.ndarray | BatchvisionError:
        failpoints.before_decode(data)
        start = time.perf_counter()
        try:
            return decode_image(data, self.input_size, max_pixels=self.max_pixels)
        except BatchvisionError as exc:
            return exc
        finally:
            if self.on_decode is not None:
                self.on_decode(time.perf_counter() - start)

    def _store(self, outcomes: list[_Outcome], finished: Sequence[Chunk], stats: ChunkStats) -> None:
        """One round trip: results, blob deletes (Redis blobs) and ledger entries of
        ``finished`` chunks. File blobs are deleted after the results are stored."""
        pipe = self.store.redis.pipeline(transaction=False)
        recorded = [self.store.record_on(pipe, o.job_id, sorted(o.results.items())) for o in outcomes]
        if self.blobs.pipelined:
            for o in outcomes:
                self.blobs.delete_many(o.job_id, list(o.indexes), pipe=pipe)
        if finished:
            ledger_done(pipe, finished)
        replies = iter(pipe.execute())
        for was_recorded in recorded:
            if not was_recorded:
                continue
            done, failed, canceled = (int(x) for x in next(replies))
            counts = Counts(done, failed, canceled)
            stats.classified += counts.done
            stats.failed += counts.failed + counts.canceled
            if self.on_recorded is not None:
                self.on_recorded(counts)
        if not self.blobs.pipelined:
            for o in outcomes:
                self.blobs.delete_many(o.job_id, list(o.indexes))
