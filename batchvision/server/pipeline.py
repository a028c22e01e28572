"""The worker's per-chunk work, free of Celery and TensorFlow so it is tested on its own.

For one message (:class:`~batchvision.server.messages.ClassifyMessage`: chunks, each a job id
and some of its image indexes): skip what already has a result (redelivery), fetch the blobs in
one round trip, decode on the decode pool (Pillow releases the GIL), hand the arrays to the
:class:`~batchvision.core.batching.DynamicBatcher` of each job's lane (its model, or a pinned
version), store every result in one idempotent write, then delete what the results replace.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchvision.core.batching import Admission, BatcherClosed, Places, Uncounted
from batchvision.core.errors import BatchvisionError, InvalidImage
from batchvision.core.imaging import decode_image, inspect_image
from batchvision.core.model_refs import JobOptions
from batchvision.core.priorities import tier_of
from batchvision.core.results import ImageResult, canceled_result, error_result
from batchvision.core.settings import Settings
from batchvision.server import failpoints
from batchvision.server.blobs import BlobStore, keep_on, spent_blobs
from batchvision.server.claims import Claim, Claims, out_of_memory
from batchvision.server.cpus import available_cpus
from batchvision.server.fetch import FairPool, Fetcher, FetchError, blob_url
from batchvision.server.keys import JobKeys
from batchvision.server.lanes import Lane, Lanes
from batchvision.server.messages import Chunk, ClassifyMessage
from batchvision.server.parking import Entry, Parked, Parking
from batchvision.server.recovery import ledger_done, ledger_failed, ledger_released, ledger_started
from batchvision.server.s3 import S3, S3Error, S3Url, TransientS3Error, is_s3_url
from batchvision.server.store import Counts, JobStore

log = logging.getLogger(__name__)


#: Where a chunk's images go: the lane of its job's model (or pinned version), and the job's options.
Route = tuple[Lane, JobOptions]


@dataclass(frozen=True)
class ProcessorLimits:
    """The limits of a :class:`ChunkProcessor`, from the worker's settings."""

    top_k: int = 5
    max_pixels: int = 50_000_000
    #: Deliveries of one image before it is stored as ``poison_image``.
    max_attempts: int = 3
    model_timeout_s: float = 600.0
    #: Images held at once (decoded or waiting for the model), see :class:`Admission`.
    max_inflight_images: int = 128
    decode_threads: int = 2
    #: Images named by URL are fetched in a bounded pool of their own, then decoded in the
    #: decode pool, so fetching overlaps decoding and inference like decoding does.
    fetch_threads: int = 16
    #: URL fetches of one API key at the same time (the keys take turns for the threads).
    fetch_per_key: int = 4
    #: Turns of a priority tier per turn of the tier below (see :class:`Admission`).
    priority_ratio: int = 3

    @classmethod
    def from_settings(cls, settings: Settings) -> ProcessorLimits:
        return cls(
            top_k=settings.top_k,
            max_pixels=settings.max_image_pixels,
            max_attempts=settings.max_attempts,
            model_timeout_s=float(settings.task_time_limit_s),
            max_inflight_images=settings.max_inflight_images or 4 * settings.max_batch_size,
            decode_threads=settings.decode_threads or available_cpus(),
            fetch_threads=settings.fetch_threads,
            fetch_per_key=settings.fetch_per_key,
            priority_ratio=settings.priority_ratio,
        )


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
class _Read:
    """The blobs of a message's chunks (``None``: expired), a result for each image the blob
    store refused, and the API key of each chunk that has URLs (``""`` for the others)."""

    blobs: list[Sequence[bytes | None]]
    results: list[dict[int, ImageResult]]
    owners: list[str]

    def only(self, keep: Sequence[int]) -> _Read:
        """The chunks at positions ``keep``."""
        return _Read(
            [self.blobs[n] for n in keep], [self.results[n] for n in keep], [self.owners[n] for n in keep]
        )


@dataclass
class _Outcome:
    """Results to store for one chunk, and the blobs to delete with them."""

    chunk: Chunk
    results: dict[int, ImageResult] = field(default_factory=dict)
    model: str = ""
    #: images whose stored result is a retryable error (a redelivery): their blobs stay
    kept: frozenset[int] = frozenset()


class Gate:
    """Fresh work passes together (:meth:`shared`), a suspect image alone (:meth:`exclusive`):
    while a suspect is in flight nothing else is, so a death of the process is its own. A
    suspect waiting goes before fresh work that comes later (else steady traffic would keep it
    out)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._queued = 0  # suspects waiting
        self.waiting = 0  # fresh work waiting (tests)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self.waiting += 1
            while self._exclusive or self._queued:
                self._cond.wait()
            self.waiting -= 1
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._queued += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._queued -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass
class ChunkProcessor:
    """Classifies messages of chunks, each image in the lane of its job's model.

    ``hand_on(chunk, model, urgent, priority, enqueued_at)``: where a chunk of a model this worker does not
    serve goes (its model's queues). ``on_recorded(counts, model)``: results newly stored (metrics).
    """

    store: JobStore
    claims: Claims
    blobs: BlobStore
    lanes: Lanes
    default_model: str
    limits: ProcessorLimits = field(default_factory=ProcessorLimits)
    fetcher: Fetcher | None = None
    #: The S3 client for images named by ``s3://`` URL (made on first use).
    s3: Callable[[], S3] | None = None
    hand_on: Callable[[Chunk, str, bool, int, float | None], None] | None = None
    on_decode: Callable[[float], None] | None = None
    on_recorded: Callable[[Counts, str], None] | None = None
    #: This worker's liveness id (:class:`~batchvision.server.liveness.Liveness`), recorded as
    #: the taker of each chunk it runs (Redis broker); ``None``: no takers recorded.
    taker: str | None = None
    _gate: Gate = field(default_factory=lambda: Gate(), repr=False)
    _admission: Admission = field(init=False, repr=False)
    _decoder: ThreadPoolExecutor = field(init=False, repr=False)
    _fetch_pool: FairPool = field(init=False, repr=False)
    _parking: Parking = field(init=False, repr=False)
    _releasing: list[threading.Thread] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._admission = Admission(max(1, self.limits.max_inflight_images), self.limits.priority_ratio)
        self._decoder = ThreadPoolExecutor(max(1, self.limits.decode_threads), thread_name_prefix="decode")
        self._fetch_pool = FairPool(self.limits.fetch_threads, self.limits.fetch_per_key)
        self._parking = Parking(self.limits.fetch_per_key)

    def release_parked(self, wait: bool = True) -> None:
        """Publish every parked chunk again (the worker begins to stop: another one runs them).
        ``wait=False``: on a thread of its own (from a signal handler, which must not call the
        broker); :meth:`close` waits for it."""
        if wait:
            self._publish(self._parking.drain())
            return
        thread = threading.Thread(target=self.release_parked, name="release-parked", daemon=True)
        self._releasing.append(thread)
        thread.start()

    def touch_parked(self) -> None:
        """Stamp the parked chunks' ledger entries anew: they are not lost, only waiting here,
        and the sweep must not send them again however long their key's flood lasts."""
        chunks = self._parking.chunks()
        if chunks:
            pipe = self.store.redis.pipeline(transaction=False)
            ledger_started(pipe, chunks, self.taker)
            pipe.execute()

    def close(self) -> None:
        for thread in self._releasing:
            thread.join()  # (each publishes what it drained: then nothing parked is left behind)
        self.release_parked()  # (parked by tasks that ran on after the shutdown began)
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self._fetch_pool.shutdown()
        if self.fetcher is not None:
            self.fetcher.close()

    def process(self, message: ClassifyMessage, retries: int = 0) -> ChunkStats:
        """Give every image of every chunk of ``message`` exactly one stored result.
        ``retries``: the task's own retries so far (not deaths of a worker).

        Raises :class:`redis.exceptions.OutOfMemoryError` (among Redis' errors) when Redis
        refused to store results: nothing of the refused chunks was deleted, so a retry, or
        the sweeper, finishes them."""
        if self.taker is not None and self._admission.busy(message.images):
            # Its turn may be long in coming: should this worker die meanwhile, its chunks are
            # sent again as soon as those it runs (its claim records the taker again).
            self.stamp(message.chunks)
        with self._admission.admit(message.images, message.interactive, tier_of(message.priority)) as places:
            return self._process(message, retries, places)

    def parked(self) -> int:
        """Chunks of URLs parked for their key's turn (see :mod:`~batchvision.server.parking`)."""
        return self._parking.parked()

    def _process(self, message: ClassifyMessage, retries: int, places: Places) -> ChunkStats:
        chunks, urgent, enqueued_at = message.chunks, message.interactive, message.enqueued_at
        stats = ChunkStats(message.jobs)
        claims = self.claims.claim_many(chunks, also=lambda pipe: ledger_started(pipe, chunks, self.taker))
        done: list[_Outcome] = []  # stored, then their blobs and ledger entries deleted
        fresh: list[tuple[_Outcome, list[int], Route]] = []  # to classify together
        suspects: list[tuple[Chunk, list[int], Route, frozenset[int]]] = []
        for chunk, claim in zip(chunks, claims, strict=True):
            if claim is None:
                log.warning(
                    "job %s is gone (expired or deleted); dropping %d images", chunk.job_id, len(chunk)
                )
                self.claims.forget(chunk.job_id)
                stats.skipped += len(chunk)
                done.append(_Outcome(chunk))
                continue
            stats.skipped += len(chunk) - len(claim.todo)
            outcome = _Outcome(chunk, kept=claim.kept)
            if not claim.todo:  # a redelivery, or the job was canceled: only the uploads are left
                done.append(outcome)
                continue
            options = JobOptions.from_hash(claim.options, self.default_model, self.limits.top_k)
            outcome.model = options.model
            if claim.canceled:
                outcome.results = {i: canceled_result() for i in claim.todo}
                done.append(outcome)
                continue
            route = self._route(options)
            if isinstance(route, BatchvisionError):  # a pinned version that cannot be loaded
                outcome.results = {i: error_result(route.code, route.message) for i in claim.todo}
                done.append(outcome)
            elif route is None:  # a model this worker does not serve: to its own queues
                self._hand_on(chunk, outcome.model, urgent, options.priority, enqueued_at)
            elif self._first_delivery(claim, retries):
                done.append(outcome)
                fresh.append((outcome, claim.todo, route))
            else:
                suspects.append((chunk, claim.todo, route, claim.kept))
                log.warning(
                    "job %s chunk %d delivered %d times: isolating images",
                    chunk.job_id,
                    chunk.first,
                    claim.deliveries,
                )
        # Only the images classified together hold places; the others' results are known, or
        # (suspects) they run one at a time outside the admission.
        places.lend(message.images - sum(len(todo) for _, todo, _ in fresh))
        entered: list[str] = []  # the keys of the chunks of URLs that run: each leaves once
        waiting: list[Parked] = []  # parked once the results are stored
        stored = False
        try:
            if fresh:
                wanted = [Chunk(o.chunk.job_id, tuple(todo)) for o, todo, _ in fresh]
                read = self._read(wanted)
                parked = self._park(fresh, read.owners, message, places, retries, entered, waiting)
                if parked:
                    done = [o for o in done if id(o) not in parked]
                    keep = [n for n, (o, _, _) in enumerate(fresh) if id(o) not in parked]
                    fresh, wanted = [fresh[n] for n in keep], [wanted[n] for n in keep]
                    read = read.only(keep)
                with self._gate.shared():
                    results = self._classify(
                        wanted, enqueued_at, urgent, [r for _, _, r in fresh], places, read
                    )
                for (outcome, _, _), res in zip(fresh, results, strict=True):
                    outcome.results = res
            self._store(done, [o.chunk for o in done], stats)
            stored = True
        finally:
            # After the store: a chunk sent back is not delivered while its message may still
            # fail (and be tried again with it). A message that failed parks nothing: its retry
            # carries those chunks.
            for owner in entered:
                self._publish(self._parking.leave(owner))
            if stored:
                self._publish(self._parking.add(waiting))
        for chunk, todo, route, kept in suspects:
            self._isolate(chunk, todo, enqueued_at, urgent, stats, route, kept)
        return stats

    def _park(
        self,
        fresh: Sequence[tuple[_Outcome, list[int], Route]],
        owners: Sequence[str],
        message: ClassifyMessage,
        places: Places,
        retries: int,
        entered: list[str],
        waiting: list[Parked],
    ) -> set[int]:
        """Set aside the chunks of URLs whose key runs its share of messages already (see
        :mod:`~batchvision.server.parking`): the ``id`` of each outcome set aside, each to
        ``waiting`` (parked once the message's results are stored); each key whose chunks run
        goes to ``entered`` once (to :meth:`Parking.leave` once). A chunk set aside was no
        delivery, and its images give their admission places back.

        A retry (``retries``) sets nothing aside: its chunks' deliveries of the failed try
        still count, and a chunk parked now would come back as a suspect."""
        aside: set[int] = set()
        if self.hand_on is None or retries:  # (no hand-on: nowhere to publish them again)
            return aside
        decided: dict[str, Entry] = {}  # the first chunk of a key decides for the message's others
        for (outcome, todo, (_, options)), owner in zip(fresh, owners, strict=True):
            if not owner:
                continue
            item = Parked(
                outcome.chunk,
                owner,
                outcome.model,
                message.interactive,
                options.priority,
                message.enqueued_at,
            )
            if owner not in decided:
                decided[owner] = self._parking.decide(item)
                if decided[owner] is Entry.RUN:
                    entered.append(owner)
                    continue
            elif decided[owner] is Entry.RUN and not self._parking.is_parked(item.chunk):
                continue
            self.claims.unclaim(outcome.chunk)  # (raises: the message fails, nothing is parked)
            places.lend(len(todo))
            aside.add(id(outcome))
            waiting.append(item)
            log.info(
                "job %s chunk %d parked: its key runs %d messages of URLs here already",
                outcome.chunk.job_id,
                outcome.chunk.first,
                self._parking.per_key,
            )
        return aside

    def _publish(self, items: Sequence[Parked]) -> None:
        """Send parked chunks to their queue again. One the broker does not take is marked
        failed in the ledger: a worker sends it after a pause (:func:`resend_failed`), as the
        API's failed publishes, not the sweep two visibility timeouts later."""
        self.release([item.chunk for item in items])
        for item in items:
            try:
                if self.hand_on is not None:
                    self.hand_on(item.chunk, item.model, item.urgent, item.priority, item.enqueued_at)
            except Exception as exc:  # noqa: BLE001 - the broker is away for the moment
                log.warning(
                    "could not publish parked chunk %s:%d again (%s); it is sent again after a pause",
                    item.chunk.job_id,
                    item.chunk.first,
                    exc,
                )
                try:
                    ledger_failed(self.store.redis, [item.chunk])
                except Exception:  # noqa: BLE001 - Redis away too: the sweep re-sends the chunk
                    log.warning(
                        "could not mark parked chunk %s:%d for a resend", item.chunk.job_id, item.chunk.first
                    )

    def _route(self, options: JobOptions) -> Route | BatchvisionError | None:
        """The lane for a job's options (``None``: the model is not served here)."""
        try:
            lane = self.lanes.lane(options)
        except BatchvisionError as exc:
            return exc
        return None if lane is None else (lane, options)

    def _hand_on(
        self, chunk: Chunk, model: str, urgent: bool, priority: int, enqueued_at: float | None
    ) -> None:
        # The chunk reached a worker of another model (the default model changed while it
        # waited, or the sweeper re-sent it): this was no delivery, and it stays in the ledger.
        log.warning(
            "job %s is for model %s, which this worker does not serve: handing it on", chunk.job_id, model
        )
        self.claims.unclaim(chunk)
        self.release([chunk])
        if self.hand_on is None:
            raise BatchvisionError(f"no worker here serves model {model!r}", code="model_not_served")
        self.hand_on(chunk, model, urgent, priority, enqueued_at)

    def stamp(self, chunks: Sequence[Chunk]) -> None:
        """Record this worker as the taker of ``chunks`` (:func:`ledger_started`), where takers
        are recorded (best effort)."""
        self._takers(chunks, lambda pipe: ledger_started(pipe, chunks, self.taker))

    def release(self, chunks: Sequence[Chunk]) -> None:
        """This worker sends ``chunks`` on (or Celery does, to retry them): no longer its own
        to lose if it dies."""
        self._takers(chunks, lambda pipe: ledger_released(pipe, chunks))

    def _takers(self, chunks: Sequence[Chunk], write: Callable[[Any], None]) -> None:
        """``write`` the takers of ``chunks`` in one round trip, where takers are recorded. Best
        effort: at worst a chunk is sent once more, or as late as before, if this worker dies."""
        if not chunks or self.taker is None:
            return
        try:
            pipe = self.store.redis.pipeline(transaction=False)
            write(pipe)
            pipe.execute()
        except Exception as exc:  # noqa: BLE001 - Redis away: the claim or the sweep makes up for it
            log.warning("could not record the taker of %d chunks: %s", len(chunks), exc)

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
        route: Route,
        kept: frozenset[int],
    ) -> None:
        # A redelivered chunk: the last delivery may have died on one of these images. Go one
        # image at a time, each with its own attempt count, so a poison image ends as a
        # per-image error after max_attempts while the others complete. A suspect runs alone in
        # this process (no other suspect, and no fresh chunk, is fetched, decoded or classified
        # meanwhile), so a death is blamed on the image that was really in flight.
        max_attempts = self.limits.max_attempts
        keep = set(kept)  # the images whose stored result is a retryable error
        for i in todo:
            one = Chunk(chunk.job_id, (i,))
            with self._gate.exclusive():
                # The first, whole-chunk delivery counts as this image's first attempt too.
                if self.claims.attempt(chunk.job_id, f"image:{i}") + 1 > max_attempts:
                    message = f"the worker died processing this image {max_attempts} times"
                    poison: dict[int, ImageResult] = {i: error_result("poison_image", message)}
                    self._store_noting_kept(_Outcome(one, poison, route[1].model), stats, keep)
                    continue
                try:
                    results = self._classify([one], enqueued_at, urgent, [route], Uncounted())[0]
                    self._store_noting_kept(_Outcome(one, results, route[1].model), stats, keep)
                except BaseException:
                    # Caught, so this process did not die on the image (the blob store or Redis
                    # failed, and the task tries again): the attempt is given back.
                    with contextlib.suppress(Exception):  # (Redis itself may be what failed)
                        self.claims.attempt(chunk.job_id, f"image:{i}", -1)
                    raise
        # The chunk's ledger entry; and every blob of the chunk where blobs do not expire (file
        # and S3 stores), but those kept for a retry: an earlier isolating delivery may have
        # stored an image and died before deleting its blob.
        leftover = [] if self.blobs.expiring else [_Outcome(chunk, kept=frozenset(keep))]
        self._store(leftover, [chunk], stats)

    def _classify(
        self,
        wanted: Sequence[Chunk],
        enqueued_at: float | None,
        urgent: bool,
        routes: Sequence[Route],
        places: Places,
        read: _Read | None = None,
    ) -> list[dict[int, ImageResult]]:
        """Decode and classify the images of ``wanted`` together, each chunk in its route's
        lane with its options; one result dict per chunk. ``read``: their blobs, if read
        already.

        An image holds its admission place (of ``places``) only while it is decoded or waits
        for the model: a URL's while it is fetched and an image's whose result is known are
        given back, so images that wait on something else never hold every place (and a
        fetched URL waiting for a place never waits on its own message's finished images)."""
        read = read or self._read(wanted)
        results, blobs, owners = read.results, read.blobs, read.owners
        decoded: list[tuple[int, int, Future[np.ndarray | BatchvisionError]]] = []
        for n, (chunk, data) in enumerate(zip(wanted, blobs, strict=True)):
            for i, blob in zip(chunk.indexes, data, strict=True):
                if i in results[n]:  # refused by the blob store
                    places.lend()
                    continue
                if blob is None:
                    places.lend()
                    results[n][i] = error_result(
                        "upload_expired", "the upload expired before it was classified"
                    )
                else:
                    decoded.append((n, i, self._prepare(blob, routes[n][0].input_size, places, owners[n])))
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
                tag = (wanted[n].job_id, enqueued_at)
                try:
                    out = slots[id(routes[n][0])].submit(image, tag=tag, urgent=urgent)
                    out.add_done_callback(lambda _: places.lend())
                    predicted.append((n, i, out))
                except BatcherClosed:  # its pinned version was unloaded meanwhile to make room
                    places.lend()
                    results[n][i] = error_result(
                        "model_busy",
                        "the model version was unloaded while this image waited: retry it "
                        "(POST /v1/jobs/{id}/retry)",
                    )
        # One deadline for the whole message: a model that hangs costs it one timeout, never
        # one per image (which could outlast the broker's visibility timeout).
        deadline = time.monotonic() + self.limits.model_timeout_s
        for n, i, out in predicted:
            lane, options = routes[n]
            try:
                left = max(0.0, deadline - time.monotonic())
                results[n][i] = lane.result(out.result(timeout=left), options)
            except TimeoutError:
                results[n][i] = error_result("inference_timeout", "the model did not answer in time")
            except BatchvisionError as exc:
                results[n][i] = error_result(exc.code, exc.message)
        return results

    def _read(self, wanted: Sequence[Chunk]) -> _Read:
        """The blobs of ``wanted``, in one round trip where the store allows, and the keys of
        those with URLs (one more)."""
        results: list[dict[int, ImageResult]] = [{} for _ in wanted]
        try:
            blobs: Sequence[Sequence[bytes | None]] = self.blobs.get_batch(
                [(c.job_id, c.indexes) for c in wanted]
            )
        except S3Error as exc:
            _retry_if_passing(exc)
            # The store refuses an object (access denied...): read them one by one, so that
            # each refused image says so and the others go on (a message that failed instead
            # would fail until its images counted as poison).
            blobs = [self._read_each(c, results[n]) for n, c in enumerate(wanted)]
        return _Read(list(blobs), results, self._owners(wanted, blobs))

    def _read_each(self, chunk: Chunk, results: dict[int, ImageResult]) -> list[bytes | None]:
        """The chunk's uploads read one at a time; a refused one is its image's error (in
        ``results``) and ``None`` here."""
        out: list[bytes | None] = []
        for i in chunk.indexes:
            try:
                (data,) = self.blobs.get_many(chunk.job_id, [i])
            except S3Error as exc:
                _retry_if_passing(exc)
                results[i] = error_result(exc.code, f"the upload could not be read: {exc.message}")
                data = None
            out.append(data)
        return out

    def _owners(self, wanted: Sequence[Chunk], blobs: Sequence[Sequence[bytes | None]]) -> list[str]:
        """The API key (owner id) of each job that has an image named by URL (one round trip;
        ``""`` for the others): fetches are shared fairly between keys."""
        urls = [n for n, data in enumerate(blobs) if any(b is not None and blob_url(b) for b in data)]
        owners = [""] * len(wanted)
        if urls:
            pipe = self.store.redis.pipeline(transaction=False)
            for n in urls:
                pipe.hget(JobKeys.of(wanted[n].job_id).job, "owner")
            for n, owner in zip(urls, pipe.execute(), strict=True):
                owners[n] = owner.decode() if isinstance(owner, bytes) else str(owner or "")
        return owners

    def _prepare(
        self, blob: bytes, size: tuple[int, int], places: Places, owner: str = ""
    ) -> Future[np.ndarray | BatchvisionError]:
        """Decode an uploaded image; fetch, then decode, an image named by URL (to ``size``;
        ``owner``: the key whose turn the fetch takes). The URL's admission place is given
        back while it is fetched, and taken again before it is decoded: slow servers of one
        key hold no place another key's images could use."""
        url = blob_url(blob)
        if url is None:
            return self._decoded(blob, size, places)
        out: Future[np.ndarray | BatchvisionError] = Future()

        def fetch() -> None:  # on a fetch thread, always (a callback may run on the caller's)
            data = self._fetch(url)
            if isinstance(data, BatchvisionError):
                out.set_result(data)
                return
            places.take()  # the fetched bytes wait here, on one of a bounded number of threads
            self._decoded(data, size, places).add_done_callback(lambda g: _relay(g, out))

        def failed(f: Future[None]) -> None:  # canceled at shutdown, or a pool already closed
            if not out.done() and (f.cancelled() or f.exception() is not None):
                out.set_exception(f.exception() if not f.cancelled() else CancelledError())

        places.lend()
        self._fetch_pool.submit(owner, fetch).add_done_callback(failed)
        return out

    def _decoded(
        self, data: bytes, size: tuple[int, int], places: Places
    ) -> Future[np.ndarray | BatchvisionError]:
        """``data`` decoded on the decode pool; an image that fails to decode gives its
        admission place back."""

        def failed(f: Future[np.ndarray | BatchvisionError]) -> None:
            if f.cancelled() or f.exception() is not None or isinstance(f.result(), BatchvisionError):
                places.lend()

        fut = self._decoder.submit(self._decode, data, size)
        fut.add_done_callback(failed)
        return fut

    def _fetch(self, url: str) -> bytes | BatchvisionError:
        if is_s3_url(url):
            return self._fetch_s3(url)
        if self.fetcher is None:
            return FetchError("this worker does not fetch image URLs", code="fetch_disabled")
        try:
            return self.fetcher.fetch(url)
        except BatchvisionError as exc:
            return exc
        except Exception as exc:  # a surprise from the HTTP stack is this image's error, not the task's
            log.warning("fetching %s failed unexpectedly", url[:200], exc_info=True)
            return FetchError(f"fetch failed: {exc}", code="fetch_failed")

    def _fetch_s3(self, url: str) -> bytes | BatchvisionError:
        """An image from a bucket, checked like an upload: S3's answers are this image's error
        (``object_not_found`` for one deleted since it was listed, ``access_denied``,
        ``bucket_not_found``, ``s3_throttled`` after the retries...)."""
        if self.s3 is None:
            return FetchError("this worker does not read s3:// URLs", code="fetch_disabled")
        try:
            data = self.s3().get(S3Url.parse(url), max_bytes=self.fetcher.max_bytes if self.fetcher else None)
            if self.fetcher is not None:
                f = self.fetcher
                inspect_image(data, max_bytes=f.max_bytes, max_pixels=f.max_pixels, max_frames=f.max_frames)
            return data
        except BatchvisionError as exc:
            return exc
        except Exception as exc:  # a surprise from the SDK is this image's error, not the task's
            log.warning("reading %s failed unexpectedly", url[:200], exc_info=True)
            return FetchError(f"reading failed: {exc}", code="fetch_failed")

    def _decode(self, data: bytes, size: tuple[int, int]) -> np.ndarray | BatchvisionError:
        failpoints.before_decode(data)
        start = time.perf_counter()
        try:
            return decode_image(data, size, max_pixels=self.limits.max_pixels)
        except BatchvisionError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - a decoder's surprise is this image's error, not the task's
            log.warning("decoding an image failed unexpectedly", exc_info=True)
            return InvalidImage(f"cannot decode image: {type(exc).__name__}: {exc}", code="corrupt_image")
        finally:
            if self.on_decode is not None:
                self.on_decode(time.perf_counter() - start)

    def _store(self, outcomes: list[_Outcome], finished: Sequence[Chunk], stats: ChunkStats) -> None:
        """Store results, then delete what they replace: the blobs of every outcome whose
        results are recorded, and the ledger entries of ``finished`` chunks.

        Deletes come only after the record succeeded: Redis refuses a script when it is out of
        memory (``noeviction``) but still runs deletions, which free memory. A refused record
        raises (after the deletes of what was recorded) and leaves its blobs and every ledger
        entry in place, so a retry or the sweeper stores it later: no image is lost.

        The blob of an image that failed for a retryable reason stays until it expires (Redis)
        or is reaped (:func:`~batchvision.server.blobs.reap_kept`), so
        ``POST /v1/jobs/{id}/retry`` can queue the image again."""
        pipe = self.store.redis.pipeline(transaction=False)
        recorded = [self.store.record_on(pipe, o.chunk.job_id, sorted(o.results.items())) for o in outcomes]
        replies = iter(pipe.execute(raise_on_error=False) if any(recorded) else [])
        stored: list[_Outcome] = []
        refused: Exception | None = None
        for was_recorded, o in zip(recorded, outcomes, strict=True):
            if not was_recorded:
                stored.append(o)
                continue
            reply = next(replies)
            if isinstance(reply, Exception):
                refused = refused or out_of_memory(reply)
                continue
            stored.append(o)
            counts = Counts(*(int(x) for x in reply))
            stats.classified += counts.done
            stats.failed += counts.failed + counts.canceled
            if self.on_recorded is not None:
                self.on_recorded(counts, o.model or self.default_model)
        pipe = self.store.redis.pipeline(transaction=False)
        spent = [self._spent(o) for o in stored]
        for o, gone in zip(stored, spent, strict=True):
            if self.blobs.pipelined:
                self.blobs.delete_many(o.chunk.job_id, gone, pipe=pipe)
            else:  # listed before anything is deleted: what a retry may need is never lost
                keep_on(pipe, self.blobs, o.chunk.job_id, set(o.chunk.indexes).difference(gone))
        if refused is None:
            ledger_done(pipe, finished)
        if len(pipe):
            pipe.execute()
        if not self.blobs.pipelined:
            # A delete the store refuses for the moment fails the task, which is retried: its
            # redelivery finds the results stored and deletes again.
            for o, gone in zip(stored, spent, strict=True):
                self.blobs.delete_many(o.chunk.job_id, gone)
        if refused is not None:
            log.warning("results not stored, kept for a retry: %s", refused)
            raise refused

    def _store_noting_kept(self, outcome: _Outcome, stats: ChunkStats, keep: set[int]) -> None:
        """:meth:`_store` one outcome, and add to ``keep`` its images whose blobs stay."""
        self._store([outcome], [], stats)
        keep.update(set(outcome.chunk.indexes).difference(self._spent(outcome)))

    def _spent(self, outcome: _Outcome) -> list[int]:
        """The indexes of ``outcome`` whose blobs go now: all but those kept for a retry."""
        return spent_blobs(outcome.chunk.indexes, outcome.results, outcome.kept)


def _retry_if_passing(exc: S3Error) -> None:
    """Raise what makes the task try again, with backoff, for a blob store that failed for the
    moment: throttled, unreachable, or a body cut short after its re-reads."""
    if isinstance(exc, TransientS3Error):
        raise exc
    if exc.code == "incomplete_download":
        raise TransientS3Error(exc.message, code=exc.code) from exc


def _relay(source: Future[Any], target: Future[Any]) -> None:
    """Complete ``target`` as ``source`` completed."""
    try:
        target.set_result(source.result())
    except BaseException as exc:
        target.set_exception(exc)
