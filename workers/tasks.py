"""Celery tasks: thin wrappers over :mod:`batchvision.server.pipeline`."""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery import Task
from kombu.exceptions import OperationalError

from batchvision.core.logs import log_context
from batchvision.server import tracing
from batchvision.server.messages import ClassifyMessage
from batchvision.server.queue import CLASSIFY_TASK
from batchvision.server.s3 import TransientS3Error
from workers.celery_app import app

log = logging.getLogger(__name__)


@app.task(
    bind=True,
    name=CLASSIFY_TASK,
    acks_late=True,
    ignore_result=True,
    # Redis hiccups, a Redis out of memory refusing results (nothing was deleted: the blobs and
    # the ledger entry stay), the broker refusing a hand-on and a blob store that is throttled
    # or unreachable are retried with backoff (results are idempotent, so a retry is safe);
    # anything else fails the task, and the chunk ledger re-sends it later.
    autoretry_for=(
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        redis.exceptions.OutOfMemoryError,
        OperationalError,
        TransientS3Error,
    ),
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
        stats = worker.processor.process(message, retries=self.request.retries or 0)
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
