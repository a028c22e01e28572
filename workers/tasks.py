"""Celery tasks: thin wrappers over :mod:`batchvision.server.pipeline`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Task, signals
from kombu.exceptions import OperationalError

from batchvision.core.logs import log_context
from batchvision.server import failpoints, tracing
from batchvision.server.messages import ClassifyMessage, MessageError
from batchvision.server.pipeline import ChunkStats
from batchvision.server.queue import CLASSIFY_TASK, uses_amqp
from batchvision.server.recovery import ledger_failed
from batchvision.server.s3 import TransientS3Error
from workers.celery_app import app

log = logging.getLogger(__name__)

#: The first pause before a message whose results Redis refused (for want of memory, or
#: unreachable) is tried again in its task; it doubles up to :data:`ROOM_MAX_S`.
ROOM_FIRST_S = 1.0
ROOM_MAX_S = 30.0

#: Redis refusing for want of memory, restarting, loading its data or out of reach: for the moment.
REDIS_AWAY = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)


def until_redis_takes_it(run: Callable[[int], ChunkStats], retries: int, for_s: float) -> ChunkStats:
    """``run(retries)``, tried again with backoff while Redis is out of memory or out of reach,
    for up to ``for_s`` seconds; then its error goes to Celery's retries. Each try counts as
    one of the task's own retries (:meth:`ChunkProcessor.process` tells them from deaths, as
    each try counts a delivery); ``run`` is handed the count.

    A full Redis (``noeviction``) refuses the results, and would refuse Celery's retry message
    too; a Redis restarting cannot take it at all. A task whose retry cannot be sent is
    dropped, its chunk left to the sweep (twice the visibility timeout: hours by default). So
    the task tries again here, its message held, until Redis is back, or the API's budget,
    expiring results or the operator make room. A try claims the chunk again and classifies
    only the images whose results are not stored yet."""
    delay = ROOM_FIRST_S
    until = time.monotonic() + for_s
    while True:
        try:
            return run(retries)
        except REDIS_AWAY as exc:
            left = until - time.monotonic()
            if left <= 0:
                raise
            what = "out of memory" if isinstance(exc, redis.exceptions.OutOfMemoryError) else "unreachable"
            log.warning(
                "Redis is %s; this message is held and tried again in %.0f s: %s",
                what,
                min(delay, left),
                exc,
            )
            time.sleep(min(delay, left))
            delay = min(2 * delay, ROOM_MAX_S)
            retries += 1


#: What a task retries itself (with backoff, up to its max_retries).
RETRIED = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    OperationalError,
    TransientS3Error,
)


def gave_up(worker: Any, message: ClassifyMessage) -> None:
    """The task failed for good and its message is acknowledged (Redis broker): its chunks are
    sent again after a pause (:func:`~batchvision.server.recovery.ledger_failed`), instead of
    waiting for the sweep. On RabbitMQ the message goes to the dead-letter queue instead."""
    if uses_amqp(worker.settings):
        return
    try:
        ledger_failed(worker.redis.client, message.chunks)
    except Exception:  # noqa: BLE001 - Redis away: the sweep re-sends the chunks later
        log.exception("could not mark the chunks of a failed task for a resend; the sweep will")


@app.task(
    bind=True,
    name=CLASSIFY_TASK,
    acks_late=True,
    ignore_result=True,
    # Redis hiccups, a Redis out of memory refusing results (nothing was deleted: the blobs and
    # the ledger entry stay), the broker refusing a hand-on and a blob store that is throttled
    # or unreachable are retried with backoff (results are idempotent, so a retry is safe);
    # anything else fails the task, and its chunks are sent again after a pause (gave_up).
    autoretry_for=RETRIED,
    retry_backoff=True,
    retry_backoff_max=30,
    max_retries=8,
)
def classify(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Classify the chunks of one message (any readable version, see
    :mod:`batchvision.server.messages`); results go to the job store."""
    message = ClassifyMessage.from_args(args, kwargs)
    worker = app.worker()
    task_id = str(self.request.id)
    jobs = message.jobs
    ids: dict[str, Any] = {"job_id": jobs[0]} if len(jobs) == 1 else {"job_ids": jobs}
    images = message.images
    with (
        log_context(task_id=task_id, **ids),
        tracing.task(self.request.get, task_id, message.chunks, message.interactive, worker.model_names),
    ):
        start = time.perf_counter()
        # Our own retries (a Redis hiccup) are not deaths: they must not make images suspects.
        settings = worker.settings
        tries = [self.request.retries or 0]

        def process(retries: int) -> ChunkStats:
            tries[0] = retries
            return worker.processor.process(message, retries=retries)

        try:
            failpoints.before_task()
            stats = until_redis_takes_it(
                process, tries[0], min(settings.task_time_limit_s, settings.visibility_timeout_s) / 2
            )
        except Exception as exc:
            # The tries made here are Celery's retries too: each counted a delivery of the chunk.
            self.request.retries = tries[0]
            if not isinstance(exc, RETRIED) or tries[0] >= (self.max_retries or 0):
                gave_up(worker, message)
            else:  # Celery sends the message again: whoever takes it is its taker
                worker.processor.release(message.chunks)
            raise
        log.info(
            "task %s: %d images of %s: %d classified, %d failed, %d skipped",
            task_id,
            images,
            " ".join(jobs),
            stats.classified,
            stats.failed,
            stats.skipped,
            extra={
                "images": images,
                "classified": stats.classified,
                "failed": stats.failed,
                "skipped": stats.skipped,
                "duration_ms": round((time.perf_counter() - start) * 1000, 3),
            },
        )
        return stats.summary()


@signals.task_received.connect
def held_until_due(request: Any = None, **_: Any) -> None:
    """A message due later (a retry's countdown) waits in this worker, unacknowledged, until
    its time: should the worker die meanwhile, its chunks are sent again as soon as those it
    runs (Redis broker; see :mod:`batchvision.server.liveness`), not after the visibility
    timeout. A message due now is recorded by its claim."""
    worker = app.runtime
    if request is None or request.eta is None or request.name != CLASSIFY_TASK or worker is None:
        return
    try:
        message = ClassifyMessage.from_args(request.args, request.kwargs)
    except MessageError:
        return  # its task says what is wrong with it
    worker.processor.stamp(message.chunks)
