"""Celery configuration and enqueueing by task name (the API never imports the workers).

A message carries one or more chunks (a job id and some of its image indexes), never image
bytes.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery

from batchvision.core.settings import Settings
from batchvision.server import tracing
from batchvision.server.dispatch import Coalescer

log = logging.getLogger(__name__)

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


#: One unit of work in a message: a job id and some of its image indexes.
Chunk = tuple[str, list[int]]


def chunked(indexes: Sequence[int], size: int) -> list[list[int]]:
    """Split image indexes into task-sized chunks, in order."""
    size = max(1, size)
    return [list(indexes[i : i + size]) for i in range(0, len(indexes), size)]


def describe(items: Sequence[Chunk]) -> str:
    """What Flower shows instead of the raw arguments (never image bytes)."""
    return "; ".join(f"job={job} images={ix[0]}..{ix[-1]} n={len(ix)}" for job, ix in items)


def publish(
    app: Celery,
    settings: Settings,
    items: Sequence[Chunk],
    enqueued_at: float,
    interactive: bool = False,
    producer: Any = None,
    contexts: Sequence[Any] = (),
) -> None:
    """Publish one classify message carrying ``items`` by task name (the API never imports
    the task). Each chunk must already be in the chunk ledger (:mod:`~batchvision.server.recovery`).

    ``contexts``: the trace context of each item's request, when another thread publishes."""
    # -- tracing and logs (issue 18): the message's headers carry the enqueue span's context.
    queue = interactive_queue(settings) if interactive else settings.queue
    task_id = str(uuid.uuid4())
    jobs = [job for job, _ in items]
    images = sum(len(ix) for _, ix in items)
    with tracing.enqueue(jobs, images, queue, task_id, contexts) as headers:
        app.send_task(
            CLASSIFY_TASK,
            args=[[[job, list(ix)] for job, ix in items], enqueued_at, interactive],
            queue=queue,
            producer=producer,
            argsrepr=describe(items),
            task_id=task_id,
            **({"headers": headers} if headers else {}),
        )
    unique = sorted(set(jobs))
    ids: dict[str, Any] = {"job_id": unique[0]} if len(unique) == 1 else {"job_ids": unique}
    log.info(
        "queued %d images of %s as task %s on %s",
        images,
        " ".join(unique),
        task_id,
        queue,
        extra={**ids, "task_id": task_id, "images": images, "queue": queue},
    )


class Enqueuer:
    """Sends chunks: bulk ones one message each, interactive ones coalesced across requests
    (see :mod:`batchvision.server.dispatch`), each message carrying up to a batch of images."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        # Items: (chunk, enqueued_at, the request's trace context or None).
        self.coalescer: Coalescer[tuple[Chunk, float, Any]] = Coalescer(
            self._send_interactive,
            max_weight=settings.max_batch_size,
            linger_s=settings.enqueue_linger_ms / 1000.0,
            weight=lambda item: len(item[0][1]),
            name="enqueue",
        )

    def send(self, chunks: Sequence[Chunk], enqueued_at: float, interactive: bool) -> None:
        """Publish ``chunks`` (already in the ledger); returns once they are on the queue."""
        if interactive and self.settings.enqueue_linger_ms > 0:
            # Bounded like a publish: a broker that is down gives the caller an error, not a hang.
            context = tracing.capture()  # the coalescer's thread publishes: hand it over
            self.coalescer.submit_many([(c, enqueued_at, context) for c in chunks], timeout_s=30.0)
            return
        with self.app.producer_or_acquire() as producer:
            for chunk in chunks:
                publish(self.app, self.settings, [chunk], enqueued_at, interactive, producer)

    def _send_interactive(self, items: list[tuple[Chunk, float, Any]]) -> None:
        chunks = [c for c, _, _ in items]
        contexts = [x for _, _, x in items]
        publish(self.app, self.settings, chunks, min(t for _, t, _ in items), True, contexts=contexts)
