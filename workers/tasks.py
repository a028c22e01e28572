"""Celery tasks: thin wrappers over :mod:`batchvision.server.pipeline`."""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery import Task

from batchvision.core.logs import log_context
from batchvision.server import tracing
from batchvision.server.queue import CLASSIFY_TASK
from workers.celery_app import app, settings
from workers.runtime import get_runtime

log = logging.getLogger(__name__)


@app.task(
    bind=True,
    name=CLASSIFY_TASK,
    acks_late=True,
    ignore_result=True,
    # Redis hiccups are retried with backoff (results are idempotent, so a retry is safe);
    # anything else fails the task, and the chunk ledger re-sends it later.
    autoretry_for=(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError),
    retry_backoff=True,
    retry_backoff_max=30,
    max_retries=8,
)
def classify(
    self: Task,
    chunks: list[list[Any]],
    enqueued_at: float | None = None,
    interactive: bool = False,
) -> dict[str, Any]:
    """Classify ``chunks``, ``[[job_id, [index, ...]], ...]``; results go to the job store."""
    runtime = get_runtime(settings)
    work = [(str(job), [int(i) for i in ix]) for job, ix in chunks]
    # -- tracing and logs (issue 18): the task's span, and its ids on every log line --------
    task_id = str(self.request.id)
    jobs = sorted({job for job, _ in work})
    ids: dict[str, Any] = {"job_id": jobs[0]} if len(jobs) == 1 else {"job_ids": jobs}
    images = sum(len(ix) for _, ix in work)
    with (
        log_context(task_id=task_id, **ids),
        tracing.task(self.request.get, task_id, work, interactive, runtime.model_name),
    ):
        start = time.perf_counter()
        # Our own retries (a Redis hiccup) are not deaths: they must not make images suspects.
        stats = runtime.processor.process(
            work,
            enqueued_at,
            urgent=interactive,
            retries=self.request.retries or 0,
        )
        log.info(
            "task %s: %d images of %s: %d classified, %d failed, %d skipped",
            task_id,
            images,
            " ".join(jobs),
            stats["classified"],
            stats["failed"],
            stats["skipped"],
            extra={
                "images": images,
                "classified": stats["classified"],
                "failed": stats["failed"],
                "skipped": stats["skipped"],
                "duration_ms": round((time.perf_counter() - start) * 1000, 3),
            },
        )
        return stats
