"""Celery configuration and enqueueing by task name (the API never imports the workers).

Tasks carry a job id and a chunk of image indexes, never image bytes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery

from batchvision.core.settings import Settings
from batchvision.server.keys import CHUNKS
from batchvision.server.recovery import chunk_member

CLASSIFY_TASK = "batchvision.classify"


def interactive_queue(settings: Settings) -> str:
    """The queue of small jobs, served ahead of bulk chunks."""
    return f"{settings.queue}.interactive"


def celery_config(settings: Settings) -> dict[str, Any]:
    """The settings both sides of the queue share. Chosen so that nothing is lost or run
    twice: late acks, requeue on a lost worker, prefetch 1 (the backlog stays in Redis,
    visible to autoscalers), JSON only, and a visibility timeout above the longest task."""
    return {
        "broker_url": settings.redis_url,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            # How soon a dead worker's unacknowledged tasks go back to the queue once the
            # visibility timeout has passed: kombu's default sweep runs only every ~100 s.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 4)),
            "unacked_restore_throttle": 1,
            # Take from the queues in the order the worker lists them (interactive first),
            # not round-robin: a free worker thread always picks a waiting small job.
            "queue_order_strategy": "priority",
            # A worker killed while it holds the restore lock would block every other
            # worker's sweep for the lock's lifetime (kombu's default: 300 s).
            "unacked_mutex_expire": max(5, min(60, settings.visibility_timeout_s // 2)),
            "socket_keepalive": True,
            "health_check_interval": 10,
        },
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_ignore_result": True,  # results live in the job store, keyed per image
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_default_queue": settings.queue,
        "task_routes": {CLASSIFY_TASK: {"queue": settings.queue}},
        "task_time_limit": settings.task_time_limit_s,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
    }


def create_celery(settings: Settings, name: str = "batchvision") -> Celery:
    """A Celery app configured for ``settings`` (workers add the tasks)."""
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def chunked(indexes: Sequence[int], size: int) -> list[list[int]]:
    """Split image indexes into task-sized chunks, in order."""
    size = max(1, size)
    return [list(indexes[i : i + size]) for i in range(0, len(indexes), size)]


def enqueue(
    app: Celery,
    settings: Settings,
    client: redis.Redis,
    job_id: str,
    indexes: Sequence[int],
    interactive: bool = False,
) -> int:
    """Send one classify task per chunk of ``indexes``; returns the number of tasks.

    Each chunk is recorded for :mod:`batchvision.server.recovery` before it is published.
    ``interactive`` chunks go to the interactive queue and to the front of the worker's batches.
    """
    chunks = chunked(indexes, settings.chunk_size)
    if not chunks:
        return 0
    now = round(time.time(), 3)
    client.zadd(CHUNKS, {chunk_member(job_id, c): now for c in chunks})
    with app.producer_or_acquire() as producer:
        for chunk in chunks:
            send_chunk(app, settings, job_id, chunk, now, producer, interactive)
    return len(chunks)


def send_chunk(
    app: Celery,
    settings: Settings,
    job_id: str,
    chunk: list[int],
    enqueued_at: float,
    producer: Any = None,
    interactive: bool = False,
) -> None:
    """Publish one classify task by name (the API never imports the task)."""
    app.send_task(
        CLASSIFY_TASK,
        args=[job_id, chunk, enqueued_at, interactive],
        queue=interactive_queue(settings) if interactive else settings.queue,
        producer=producer,
        # Flower shows this instead of the raw argument list.
        argsrepr=f"job={job_id} images={chunk[0]}..{chunk[-1]} n={len(chunk)}",
    )
