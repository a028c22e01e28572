"""What a caller does to a job after submitting it: retry its failed images, cancel it, delete it.

**Retry** queues again the images of a finished job whose stored error is retryable
(:func:`batchvision.core.results.retryable`), exactly once each however many retries race:
the job's hash and results are watched (``WATCH``) while the candidates are read, and one
``MULTI`` runs the :data:`~batchvision.server.lua.RETRY` script (results removed, counters and
quotas raised, the job running again) with the chunk ledger entries of the new chunks, so a
concurrent retry, a delete or a late result aborts it, and the next try sees the job running.
Its input must still be held: the workers keep the blob of an image that failed for a
retryable reason until it expires (``BLOB_TTL_S`` after the upload in Redis; a file or S3 store
lists it to be reaped ``BLOB_TTL_S`` after its error); an image whose blob is gone stays as it
is and is listed as ``input_expired``.

**Delete** removes the job, its results, its place in its owner's job list and every blob
(kept ones included), and gives back what it still had queued to the counters; a worker that
takes one of its chunks later drops it. Afterwards every route answers 404.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from batchvision.core.errors import Conflict
from batchvision.server.blobs import unkeep_on
from batchvision.server.intake import Intake
from batchvision.server.job_list import index_job, unindex_job
from batchvision.server.keys import JobKeys
from batchvision.server.messages import Chunk, split
from batchvision.server.recovery import ledger_add, ledger_done
from batchvision.server.routing import default_model
from batchvision.server.text import as_text_or_none

#: Blobs deleted per round trip when a job is deleted.
DELETE_PAGE = 1000
#: Tries of a retry that a concurrent change of the job aborted (the next read sees why).
_WATCH_TRIES = 5
#: The negative replies of :data:`~batchvision.server.lua.RETRY`.
_NO_JOB, _NOT_FINISHED, _CANCELED = -1, -2, -3


@dataclass(frozen=True)
class NotRequeued:
    """An image with a retryable error that was not queued again, and why."""

    index: int
    code: str
    reason: str


@dataclass(frozen=True)
class Retry:
    """What a retry did: how many images it queued again, and those it could not."""

    requeued: int
    not_requeued: tuple[NotRequeued, ...] = ()


def retry(intake: Intake, job_id: str) -> Retry:
    """Queue again the images of the finished job ``job_id`` whose errors are retryable.

    Raises ``LookupError`` for an unknown job, :class:`Conflict` (``409 job_running``) for a job
    not finished (another retry may just have started it again) and ``job_canceled`` for a
    canceled one; ``TooManyRequests`` when the queue cannot take the images now."""
    store, k = intake.store, JobKeys.of(job_id)
    for _ in range(_WATCH_TRIES):
        with intake.redis.pipeline() as pipe:
            pipe.watch(k.job, k.results)  # type: ignore[no-untyped-call, unused-ignore]
            fields = pipe.hmget(k.job, ["created_at", "finished_at", "cancel", "owner", "model"])
            created, finished, cancel, owner, model = (as_text_or_none(v) for v in fields)
            if created is None:
                raise LookupError(job_id)
            if cancel not in (None, "0"):
                raise Conflict(f"job {job_id} was canceled: nothing is retried", code="job_canceled")
            if finished is None:
                raise Conflict(
                    f"job {job_id} is still running (or open for uploads): retry it once it has finished",
                    code="job_running",
                )
            _require_known_model(intake, job_id, model)
            failed = store.retryable_failures(pipe, job_id)
            sizes = dict(zip(failed, intake.blobs.sizes(job_id, list(failed)), strict=True))
            held = [(i, n) for i, n in sizes.items() if n > 0]
            gone = tuple(NotRequeued(i, failed[i].code, "input_expired") for i, n in sizes.items() if n == 0)
            if not held:
                return Retry(0, gone)
            with intake.backpressure(owner or "", len(held), sum(n for _, n in held)) as hold:
                chunks = split(job_id, [i for i, _ in held], intake.settings.chunk_size)
                now = round(time.time(), 3)
                pipe.multi()
                # A store that lists its kept blobs: an image whose blob the reaper took (or is
                # taking) since the sizes were read stays as it is (listed as input_expired).
                store.requeue(pipe, job_id, held, listed=not intake.blobs.expiring)
                ledger_add(pipe, chunks, now)
                # The job lives on: so does its place in the owner's list.
                index_job(pipe, owner or "", job_id, float(created), store.result_ttl_s + store.open_ttl_s)
                hold.release_on(pipe)
                try:
                    reply = pipe.execute()[0]
                    hold.released()
                except redis.WatchError:
                    continue  # the job changed meanwhile: read it again
        requeued, reaped = (int(reply[0]), reply[1:]) if isinstance(reply, list) else (int(reply), [])
        gone += tuple(NotRequeued(int(i), failed[int(i)].code, "input_expired") for i in reaped)
        if requeued <= 0:
            # The script found nothing to requeue (its checks repeat the ones above, for a change
            # WATCH cannot see, such as an expiry): the MULTI cannot depend on its reply, so the
            # ledger entries it added go now, before the sweep would take them for lost chunks.
            _undo_retry(intake, job_id, owner or "", chunks, requeued)
            return Retry(0, gone)
        interactive = requeued <= intake.settings.interactive_max_images
        routing = store.routing_of(job_id)  # the job's model and priority, as when it was made
        intake.send(chunks, now, interactive, model=routing.model, priority=routing.priority)
        return Retry(requeued, gone)
    raise Conflict(f"job {job_id} kept changing during the retry; try again", code="job_running")


def _require_known_model(intake: Intake, job_id: str, model: str | None) -> None:
    """Refuse (``409 model_forgotten``) to requeue images for a model that was removed from the
    registry (``DELETE /v1/models/{name}``): no worker reads its queues, and they would wait
    there for good."""
    if intake.models is None or model is None or model == default_model(intake.settings):
        return
    if model not in intake.models.raw(fresh=True):
        raise Conflict(
            f"job {job_id}'s model {model!r} was removed from the registry (no worker serves it): "
            "its images cannot be classified again; submit them again with a model of GET /v1/models",
            code="model_forgotten",
        )


def _undo_retry(intake: Intake, job_id: str, owner: str, chunks: Sequence[Chunk], reply: int) -> None:
    """Remove what a retry's ``MULTI`` added around a :data:`~batchvision.server.lua.RETRY`
    that requeued nothing (``reply`` <= 0), and raise what its negative reply means."""
    with intake.redis.pipeline() as pipe:
        ledger_done(pipe, chunks)
        if reply == _NO_JOB:
            unindex_job(pipe, owner, job_id)
        pipe.execute()
    if reply == _NO_JOB:
        raise LookupError(job_id)
    if reply == _NOT_FINISHED:
        raise Conflict(f"job {job_id} is running again: retry it once it has finished", code="job_running")
    if reply == _CANCELED:
        raise Conflict(f"job {job_id} was canceled: nothing is retried", code="job_canceled")


def delete(intake: Intake, job_id: str, owner: str) -> None:
    """Remove ``job_id``, its results and its blobs. What it still has queued is given back
    to the counters at once; a worker that takes one of its chunks finds the job gone and
    drops it (no result is written for a job that is gone). Nothing is written first, so a
    full Redis can delete a job to free memory."""
    total = int(intake.redis.hget(JobKeys.of(job_id).job, "total") or 0)
    intake.store.remove(job_id, owner)
    for start in range(0, total, DELETE_PAGE):
        page = list(range(start, min(total, start + DELETE_PAGE)))
        intake.blobs.delete_many(job_id, page)
        if not intake.blobs.expiring:
            with intake.redis.pipeline(transaction=False) as pipe:
                unkeep_on(pipe, job_id, page)
                pipe.execute()
