"""Celery tasks: thin wrappers over :mod:`batchvision.server.pipeline`."""

from __future__ import annotations

from typing import Any

import redis
from celery import Task

from batchvision.server.queue import CLASSIFY_TASK
from workers.celery_app import app, settings
from workers.runtime import get_runtime


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
    # Our own retries (a Redis hiccup) are not deaths: they must not make images suspects.
    return runtime.processor.process(
        [(str(job), [int(i) for i in ix]) for job, ix in chunks],
        enqueued_at,
        urgent=interactive,
        retries=self.request.retries or 0,
    )
