"""Celery tasks: thin wrappers over :mod:`batchvision.pipeline`."""

from __future__ import annotations

from typing import Any

from batchvision.queue import CLASSIFY_TASK
from batchvision.recovery import chunk_done
from workers.celery_app import app, settings
from workers.runtime import get_runtime


@app.task(name=CLASSIFY_TASK, acks_late=True, ignore_result=True)
def classify(job_id: str, indexes: list[int], enqueued_at: float | None = None) -> dict[str, Any]:
    """Classify images ``indexes`` of job ``job_id``; results go to the job store."""
    runtime = get_runtime(settings)
    summary = runtime.processor.process(job_id, indexes, enqueued_at)
    chunk_done(runtime.processor.store.redis, job_id, indexes)
    return summary
