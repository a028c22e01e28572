"""Per-process worker state: the model, the batcher and the store, created once."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from celery import Celery

from batchvision.core.batching import BatchInfo, DynamicBatcher
from batchvision.core.settings import Settings
from batchvision.server import tracing
from batchvision.server.blobs import open_blobs
from batchvision.server.claims import Claims
from batchvision.server.connect import connect_redis
from batchvision.server.deadletter import DeadLetterConsumer, DeadLetters
from batchvision.server.fetch import AllowList, Fetcher, SafeHTTP
from batchvision.server.models import ModelRegistry
from batchvision.server.pipeline import ChunkProcessor
from batchvision.server.queue import amqp_backlog, create_celery, publish, uses_amqp
from batchvision.server.recovery import Sweeper, sweep
from batchvision.server.routing import default_model, model_queues
from batchvision.server.store import JobStore
from batchvision.server.telemetry import BatchLog, Telemetry
from batchvision.server.webhooks import Deliverer
from workers import metrics

if TYPE_CHECKING:
    from workers.manager import ModelLane, ModelManager

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    processor: ChunkProcessor
    batcher: DynamicBatcher[np.ndarray, Any]
    model_name: str
    device: str
    sweeper: Sweeper | None = None
    dead_letters: DeadLetterConsumer | None = None  # issue 16: RabbitMQ's dead-letter queue
    deliverer: Deliverer | None = None  # issue 15: completion webhooks
    models: ModelManager | None = None  # issue 14: the models, their lanes and versions


_lock = threading.Lock()
_runtime: Runtime | None = None


def get_runtime(settings: Settings) -> Runtime:
    """The process's runtime, built on first use (model loaded exactly once)."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = _build(settings)
        return _runtime


def shutdown() -> None:
    global _runtime
    with _lock:
        if _runtime is not None:
            if _runtime.models is not None:
                _runtime.models.close()  # every lane's batcher (the default one's too)
            _runtime.batcher.close()
            _runtime.processor.close()
            if _runtime.sweeper is not None:
                _runtime.sweeper.stop()
            if _runtime.dead_letters is not None:
                _runtime.dead_letters.stop()
            if _runtime.deliverer is not None:
                _runtime.deliverer.stop()
            _runtime = None


def start_sweeper(settings: Settings, app: Celery) -> None:
    """Re-send chunks whose message a dead worker took with it (see batchvision.server.recovery).

    On RabbitMQ (issue 16) no message is lost that way; the sweep still re-sends chunks whose
    publish failed after their job was stored (the broker was down: the client got a 503), and
    the consumer of the dead-letter queue handles failed and over-limit messages
    (see batchvision.server.deadletter)."""
    runtime = get_runtime(settings)
    amqp = uses_amqp(settings)
    if amqp:
        p = runtime.processor
        runtime.dead_letters = DeadLetterConsumer(DeadLetters(settings, p.store, p.claims, p.blobs))
        runtime.dead_letters.start()
    vt = settings.visibility_timeout_s

    def resend(job_id: str, indexes: list[int]) -> None:
        model = runtime.processor.store.model_of(job_id)  # issue 14: to its model's queue
        publish(app, settings, [(job_id, indexes)], time.time(), model=model)

    def run() -> int:
        # Every model's queues (issue 14): a backlog of any model may still hold the chunks.
        registry = runtime.models.registry if runtime.models is not None else None
        known = {default_model(settings), *(registry.model_names() if registry is not None else [])}
        queues = [q for pair in model_queues(settings, known).values() for q in pair]
        if amqp:  # issue 16: the queues are RabbitMQ's; sweep only while none has a backlog
            if amqp_backlog(settings, queues):
                return 0
            queues = []
        # Twice the visibility timeout: kombu's own restore gets the first chance.
        return sweep(runtime.processor.store, queues, 2 * vt + 2.0, resend)

    runtime.sweeper = Sweeper(max(1.0, min(60.0, vt / 3)), run)
    runtime.sweeper.start()


def _build(settings: Settings) -> Runtime:
    from workers.manager import ModelManager

    start = time.perf_counter()
    client = connect_redis(settings.redis_url)
    store = JobStore(client, result_ttl_s=settings.result_ttl_s, blob_ttl_s=settings.blob_ttl_s)

    telemetry = Telemetry(client)
    batch_log = BatchLog(telemetry)  # the model thread never waits on Redis

    def on_batch_for(lane: ModelLane) -> Callable[[BatchInfo], None]:
        """The batch hook of one model's lane (issue 14: each model has its own batcher)."""

        def on_batch(info: BatchInfo) -> None:
            version = lane.last.version if lane.last is not None else None
            metrics.observe_batch(info, lane.model)
            jobs = [str(tag[0]) for tag in info.tags]
            batch_log.put(info.size, jobs, lane.model, version)
            # -- tracing and logs (issue 18): the batch's span (linked to its tasks) and log line
            tracing.record_batch(info, lane.model)
            unique = sorted(set(jobs))
            log.info(
                "batch of %d images from %d job(s), model %s version %s: waited %.1f ms, model %.1f ms",
                info.size,
                len(unique),
                lane.model,
                version,
                info.wait_s * 1000,
                info.run_s * 1000,
                extra={
                    "batch_size": info.size,
                    "job_ids": unique,
                    "wait_ms": round(info.wait_s * 1000, 3),
                    "model_ms": round(info.run_s * 1000, 3),
                    "model": lane.model,
                    "model_version": version,
                },
            )

        return on_batch

    # Issue 14: the models this worker serves (BATCHVISION_WORKER_MODELS, default every model
    # of the repository), each with its lane; new versions load in the background and go live
    # between two batches. Raises (the worker does not start) if a model cannot load at all.
    manager = ModelManager(
        settings, ModelRegistry(client), on_batch_for=on_batch_for, on_switch=metrics.observe_switch
    )
    manager.start()
    load_s = time.perf_counter() - start
    lane = manager.default_lane()
    batcher = lane.batcher
    live = manager.models[lane.model].live.classifier
    devices = {name: served.live.classifier.device for name, served in manager.models.items()}

    publisher: list[Celery] = []  # created on first use: a chunk of another model is rare

    def hand_on(job_id: str, indexes: list[int], model: str, urgent: bool) -> None:
        if not publisher:
            publisher.append(create_celery(settings, name="batchvision-worker-hand-on"))
        publish(publisher[0], settings, [(job_id, indexes)], time.time(), urgent, model=model)

    processor = ChunkProcessor(
        store=store,
        claims=Claims(client, ttl_s=settings.blob_ttl_s),
        blobs=open_blobs(settings.blob_url, client, settings.blob_ttl_s),
        batcher=batcher,
        labels=live.labels,
        input_size=live.input_size,
        top_k=settings.top_k,
        max_pixels=settings.max_image_pixels,
        max_attempts=settings.max_attempts,
        model_timeout_s=float(settings.task_time_limit_s),
        max_inflight_images=settings.max_inflight_images or 4 * settings.max_batch_size,
        decode_threads=settings.decode_threads or len(os.sched_getaffinity(0)),
        on_decode=metrics.DECODE.observe,
        lanes=manager,
        default_model=default_model(settings),
        hand_on=hand_on,
        on_recorded_model=metrics.observe_recorded,
        fetcher=Fetcher.from_settings(settings),  # issue 15: images named by URL
        fetch_threads=settings.fetch_threads,
        fetch_per_key=settings.fetch_per_key,
    )
    metrics.serve(settings.worker_metrics_port, devices, load_s, settings.worker_metrics_host)
    # Issue 15: every worker process delivers completion webhooks; pending ones live in Redis,
    # so a worker killed mid-delivery leaves its lease to expire and another one sends it.
    webhook_http = SafeHTTP(
        AllowList.parse(settings.webhook_allow), connect_timeout_s=settings.fetch_connect_timeout_s
    )
    deliverer = Deliverer(client, settings, webhook_http)
    deliverer.start()
    return Runtime(
        processor,
        batcher,
        ",".join(manager.names()),
        ",".join(sorted(set(devices.values()))),
        deliverer=deliverer,
        models=manager,
    )
