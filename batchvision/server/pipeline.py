"""The worker's per-chunk work, free of Celery and TensorFlow so it is tested on its own.

For one task (a job id and a chunk of image indexes): skip what already has a result
(redelivery), fetch the blobs in one round trip, decode each image in the calling thread
(Pillow releases the GIL, so task threads decode in parallel), hand the arrays to the shared
:class:`~batchvision.core.batching.DynamicBatcher`, and store every result in one idempotent write.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchvision.core.batching import Admission, DynamicBatcher
from batchvision.core.errors import BatchvisionError
from batchvision.core.imaging import decode_image
from batchvision.core.models import JobOptions
from batchvision.core.schemas import canceled_result, error_result
from batchvision.server import failpoints
from batchvision.server.blobs import BlobStore
from batchvision.server.claims import Claim, Claims
from batchvision.server.fetch import FairPool, Fetcher, FetchError, blob_url
from batchvision.server.keys import JobKeys
from batchvision.server.lanes import Lane, Lanes, SingleLane
from batchvision.server.recovery import ledger_done, ledger_started
from batchvision.server.store import Counts, JobStore

log = logging.getLogger(__name__)


Chunk = tuple[str, Sequence[int]]
#: Where a chunk's images go (issue 14): the lane of its job's model, and the job's options.
Route = tuple[Lane, JobOptions]


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
    model: str = ""


@dataclass
class ChunkProcessor:
    """Classifies messages of chunks through a shared batcher."""

    store: JobStore
    claims: Claims
    blobs: BlobStore
    batcher: DynamicBatcher[np.ndarray, Any]
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
    #: Images named by URL (issue 15): fetched in a bounded pool of their own, then decoded in
    #: the decode pool, so fetching overlaps decoding and inference like decoding does.
    fetcher: Fetcher | None = None
    fetch_threads: int = 16
    #: URL fetches of one API key at the same time (the keys take turns for the threads).
    fetch_per_key: int = 4
    # -- several models (issue 14): the worker's lanes, the model of a job that names none,
    # where a chunk of a model this worker does not serve is handed on (job, indexes, model,
    # urgent), and newly stored results by model (metrics).
    lanes: Lanes | None = None
    default_model: str = ""
    hand_on: Callable[[str, list[int], str, bool], None] | None = None
    on_recorded_model: Callable[[Counts, str], None] | None = None
    _isolation: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _admission: Admission = field(init=False, repr=False)
    _decoder: ThreadPoolExecutor = field(init=False, repr=False)
    _fetch_pool: FairPool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._admission = Admission(max(1, self.max_inflight_images))
        self._decoder = ThreadPoolExecutor(max(1, self.decode_threads), thread_name_prefix="decode")
        self._fetch_pool = FairPool(self.fetch_threads, self.fetch_per_key)

    def close(self) -> None:
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self._fetch_pool.shutdown()
        if self.fetcher is not None:
            self.fetcher.close()

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
        fresh: list[tuple[_Outcome, list[int], Route]] = []  # to classify together
        suspects: list[tuple[Chunk, list[int], Route]] = []
        handed: list[Chunk] = []  # another model's: neither stored nor finished here
        for chunk, claim in zip(chunks, claims, strict=True):
            job_id, indexes = chunk
            if claim is None:
                log.warning("job %s is gone (expired or deleted); dropping %d images", job_id, len(indexes))
                self.claims.forget(job_id)
                stats.skipped += len(indexes)
                done.append(_Outcome(job_id, indexes))
                continue
            stats.skipped += len(indexes) - len(claim.todo)
            outcome = _Outcome(job_id, indexes)
            done.append(outcome)
            if not claim.todo:  # a redelivery, or the job was canceled: only the uploads are left
                continue
            options = JobOptions.from_hash(claim.options, self.default_model, self.top_k)
            outcome.model = options.model
            route = None if claim.canceled else self._route(options)
            if claim.canceled:
                outcome.results = {i: canceled_result() for i in claim.todo}
            elif isinstance(route, BatchvisionError):  # a pinned version that cannot be loaded
                outcome.results = {i: error_result(route.code, route.message) for i in claim.todo}
            elif route is None:  # a model this worker does not serve: to its own queues
                done.pop()
                handed.append(chunk)
                self._hand_on(chunk, outcome.model, urgent)
            elif self._first_delivery(claim, retries):
                fresh.append((outcome, claim.todo, route))
            else:
                done.pop()
                suspects.append((chunk, claim.todo, route))
                log.warning(
                    "job %s chunk %d delivered %d times: isolating images",
                    job_id,
                    indexes[0],
                    claim.deliveries,
                )
        if fresh:
            wanted = [(o.job_id, todo) for o, todo, _ in fresh]
            results = self._classify(wanted, enqueued_at, urgent, [r for _, _, r in fresh])
            for (outcome, _, _), res in zip(fresh, results, strict=True):
                outcome.results = res
        isolated = [id(chunk) for chunk, _, _ in suspects] + [id(chunk) for chunk in handed]
        self._store(done, [c for c in chunks if id(c) not in isolated], stats)
        for chunk, todo, route in suspects:
            self._isolate(chunk, todo, enqueued_at, urgent, stats, route)
        return stats.summary()

    def _route(self, options: JobOptions) -> Route | BatchvisionError | None:
        """The lane for a job's options (``None``: the model is not served here)."""
        if self.lanes is None:
            return self._single_lane(), options
        try:
            lane = self.lanes.lane(options)
        except BatchvisionError as exc:
            return exc
        return None if lane is None else (lane, options)

    def _single_lane(self) -> SingleLane:
        return SingleLane(self.batcher, self.labels, self.input_size)

    def _hand_on(self, chunk: Chunk, model: str, urgent: bool) -> None:
        # The chunk reached a worker of another model (the default model changed while it
        # waited, or the sweeper re-sent it): this was no delivery, and it stays in the ledger.
        job_id, indexes = chunk
        log.warning("job %s is for model %s, which this worker does not serve: handing it on", job_id, model)
        self.claims.unclaim(job_id, indexes)
        if self.hand_on is None:
            raise BatchvisionError(f"no worker here serves model {model!r}", code="model_not_served")
        self.hand_on(job_id, list(indexes), model, urgent)

    @staticmethod
    def _first_delivery(claim: Claim, retries: int) -> bool:
        # Our own retries (a Redis hiccup, counted by Celery) are not deaths.
        return claim.deliveries - retries <= 1

    def _isolate(
        self,
        chunk: Chunk,
        todo: list[int],
        enqueued_at: float | None,
        urgent: bool,
        stats: ChunkStats,
        route: Route | None = None,
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
                    routes = [route] if route is not None else None
                    results = self._classify([(job_id, [i])], enqueued_at, urgent, routes)[0]
                model = route[1].model if route is not None else ""
                self._store([_Outcome(job_id, [i], results, model)], [], stats)
        self._store([], [chunk], stats)

    def _classify(
        self,
        wanted: list[tuple[str, list[int]]],
        enqueued_at: float | None,
        urgent: bool,
        routes: Sequence[Route] | None = None,
    ) -> list[dict[int, dict[str, Any]]]:
        """Decode and classify ``(job, indexes)`` pairs together; one result dict per pair.
        ``routes``: each pair's lane and options (default: the processor's one model)."""
        if routes is None:
            single: Route = (self._single_lane(), JobOptions(self.default_model, top_k=self.top_k))
            routes = [single] * len(wanted)
        results: list[dict[int, dict[str, Any]]] = [{} for _ in wanted]
        blobs = self.blobs.get_batch(wanted)
        owners = self._owners(wanted, blobs)
        decoded: list[tuple[int, int, Future[np.ndarray | BatchvisionError]]] = []
        for n, ((_, todo), data) in enumerate(zip(wanted, blobs, strict=True)):
            for i, blob in zip(todo, data, strict=True):
                if blob is None:
                    results[n][i] = error_result(
                        "upload_expired", "the upload expired before it was classified"
                    )
                else:
                    decoded.append((n, i, self._prepare(blob, routes[n][0].input_size, owners[n])))
        predicted: list[tuple[int, int, Future[Any]]] = []
        where = {fut: (n, i) for n, i, fut in decoded}
        # One reservation per lane (a message holds one model's chunks; pinned versions of it
        # have lanes of their own).
        lanes = {id(routes[n][0]): routes[n][0] for n, _, _ in decoded}
        counts = Counter(id(routes[n][0]) for n, _, _ in decoded)
        with contextlib.ExitStack() as stack:
            slots = {
                key: stack.enter_context(lane.batcher.reserve(counts[key])) for key, lane in lanes.items()
            }
            # In the order they are ready: a slow URL holds back no image behind it.
            for fut in as_completed(where):
                n, i = where[fut]
                image = fut.result()
                if isinstance(image, BatchvisionError):
                    results[n][i] = error_result(image.code, image.message)
                    continue
                tag = (wanted[n][0], enqueued_at)
                predicted.append((n, i, slots[id(routes[n][0])].submit(image, tag=tag, urgent=urgent)))
        for n, i, out in predicted:
            lane, options = routes[n]
            try:
                results[n][i] = lane.result(out.result(timeout=self.model_timeout_s), options)
            except TimeoutError:
                results[n][i] = error_result("inference_timeout", "the model did not answer in time")
            except BatchvisionError as exc:
                results[n][i] = error_result(exc.code, exc.message)
        return results

    def _owners(
        self, wanted: list[tuple[str, list[int]]], blobs: Sequence[Sequence[bytes | None]]
    ) -> list[str]:
        """The API key (owner id) of each job that has an image named by URL (one round trip;
        ``""`` for the others): fetches are shared fairly between keys."""
        urls = [n for n, data in enumerate(blobs) if any(b is not None and blob_url(b) for b in data)]
        owners = [""] * len(wanted)
        if urls:
            pipe = self.store.redis.pipeline(transaction=False)
            for n in urls:
                pipe.hget(JobKeys.of(wanted[n][0]).job, "owner")
            for n, owner in zip(urls, pipe.execute(), strict=True):
                owners[n] = owner.decode() if isinstance(owner, bytes) else str(owner or "")
        return owners

    def _prepare(
        self, blob: bytes, size: tuple[int, int] | None = None, owner: str = ""
    ) -> Future[np.ndarray | BatchvisionError]:
        """Decode an uploaded image; fetch, then decode, an image named by URL (to ``size``,
        default the processor's input size; ``owner``: the key whose turn the fetch takes)."""
        url = blob_url(blob)
        if url is None:
            return self._decoder.submit(self._decode, blob, size)
        out: Future[np.ndarray | BatchvisionError] = Future()

        def fetched(f: Future[bytes | BatchvisionError]) -> None:
            try:
                data = f.result()
                if isinstance(data, BatchvisionError):
                    out.set_result(data)
                    return
                self._decoder.submit(self._decode, data, size).add_done_callback(lambda g: _relay(g, out))
            except BaseException as exc:  # canceled at shutdown, or a pool already closed
                out.set_exception(exc)

        self._fetch_pool.submit(owner, self._fetch, url).add_done_callback(fetched)
        return out

    def _fetch(self, url: str) -> bytes | BatchvisionError:
        if self.fetcher is None:
            return FetchError("this worker does not fetch image URLs", code="fetch_disabled")
        try:
            return self.fetcher.fetch(url)
        except BatchvisionError as exc:
            return exc
        except Exception as exc:  # a surprise from the HTTP stack is this image's error, not the task's
            log.warning("fetching %s failed unexpectedly", url[:200], exc_info=True)
            return FetchError(f"fetch failed: {exc}", code="fetch_failed")

    def _decode(self, data: bytes, size: tuple[int, int] | None = None) -> np.ndarray | BatchvisionError:
        failpoints.before_decode(data)
        start = time.perf_counter()
        try:
            return decode_image(data, size or self.input_size, max_pixels=self.max_pixels)
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
        for was_recorded, o in zip(recorded, outcomes, strict=True):
            if not was_recorded:
                continue
            done, failed, canceled = (int(x) for x in next(replies))
            counts = Counts(done, failed, canceled)
            stats.classified += counts.done
            stats.failed += counts.failed + counts.canceled
            if self.on_recorded is not None:
                self.on_recorded(counts)
            if self.on_recorded_model is not None:
                self.on_recorded_model(counts, o.model or self.default_model)
        if not self.blobs.pipelined:
            for o in outcomes:
                self.blobs.delete_many(o.job_id, list(o.indexes))


def _relay(source: Future[Any], target: Future[Any]) -> None:
    """Complete ``target`` as ``source`` completed."""
    try:
        target.set_result(source.result())
    except BaseException as exc:
        target.set_exception(exc)
