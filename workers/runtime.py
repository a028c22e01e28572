"""Per-process worker state: the model, the batcher and the store, created once."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
from celery import Celery

from batchvision.core.batching import BatchInfo, DynamicBatcher
from batchvision.core.settings import Settings
from batchvision.server import failpoints, tracing
from batchvision.server.blobs import open_blobs
from batchvision.server.claims import Claims
from batchvision.server.connect import connect_redis
from batchvision.server.pipeline import ChunkProcessor
from batchvision.server.queue import interactive_queue, publish
from batchvision.server.recovery import Sweeper, sweep
from batchvision.server.store import JobStore
from batchvision.server.telemetry import BatchLog, Telemetry
from workers import metrics

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    processor: ChunkProcessor
    batcher: DynamicBatcher[np.ndarray, np.ndarray]
    model_name: str
    device: str
    sweeper: Sweeper | None = None


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
            _runtime.batcher.close()
            _runtime.processor.close()
            if _runtime.sweeper is not None:
                _runtime.sweeper.stop()
            _runtime = None


def start_sweeper(settings: Settings, app: Celery) -> None:
    """Re-send chunks whose message a dead worker took with it (see batchvision.server.recovery)."""
    runtime = get_runtime(settings)
    vt = settings.visibility_timeout_s

    def resend(job_id: str, indexes: list[int]) -> None:
        publish(app, settings, [(job_id, indexes)], time.time())

    def run() -> int:
        queues = (settings.queue, interactive_queue(settings))
        # Twice the visibility timeout: kombu's own restore gets the first chance.
        return sweep(runtime.processor.store, queues, 2 * vt + 2.0, resend)

    runtime.sweeper = Sweeper(max(1.0, min(60.0, vt / 3)), run)
    runtime.sweeper.start()


def _build(settings: Settings) -> Runtime:
    from workers.model import load_classifier

    start = time.perf_counter()
    classifier = load_classifier(settings)
    warm = classifier.warm_up()
    load_s = time.perf_counter() - start
    log.info(
        "model %s loaded on %s in %.1fs (warm-up %.2fs), input %s",
        classifier.name,
        classifier.device,
        load_s,
        warm,
        classifier.input_size,
    )
    client = connect_redis(settings.redis_url)
    store = JobStore(client, result_ttl_s=settings.result_ttl_s, blob_ttl_s=settings.blob_ttl_s)

    telemetry = Telemetry(client)
    batch_log = BatchLog(telemetry)  # the model thread never waits on Redis

    def on_batch(info: BatchInfo) -> None:
        metrics.observe_batch(info)
        jobs = [str(tag[0]) for tag in info.tags]
        batch_log.put(info.size, jobs)
        # -- tracing and logs (issue 18): the batch's span (linked to its tasks) and log line
        tracing.record_batch(info, classifier.name)
        unique = sorted(set(jobs))
        log.info(
            "batch of %d images from %d job(s): waited %.1f ms, model %.1f ms",
            info.size,
            len(unique),
            info.wait_s * 1000,
            info.run_s * 1000,
            extra={
                "batch_size": info.size,
                "job_ids": unique,
                "wait_ms": round(info.wait_s * 1000, 3),
                "model_ms": round(info.run_s * 1000, 3),
                "model": classifier.name,
            },
        )

    def predict(images: list[np.ndarray]) -> list[np.ndarray]:
        failpoints.before_batch()
        return classifier.predict(images)

    # With tracing on, a batcher that remembers each item's task span (issue 18).
    batcher: DynamicBatcher[np.ndarray, np.ndarray] = tracing.batcher_class()(
        predict,
        max_batch_size=settings.max_batch_size,
        max_delay_s=settings.max_batch_delay_ms / 1000.0,
        on_batch=on_batch,
        name="model",
    )
    processor = ChunkProcessor(
        store=store,
        claims=Claims(client, ttl_s=settings.blob_ttl_s),
        blobs=open_blobs(settings.blob_url, client, settings.blob_ttl_s),
        batcher=batcher,
        labels=classifier.labels,
        input_size=classifier.input_size,
        top_k=settings.top_k,
        max_pixels=settings.max_image_pixels,
        max_attempts=settings.max_attempts,
        model_timeout_s=float(settings.task_time_limit_s),
        max_inflight_images=settings.max_inflight_images or 4 * settings.max_batch_size,
        decode_threads=settings.decode_threads or len(os.sched_getaffinity(0)),
        on_decode=metrics.DECODE.observe,
        on_recorded=metrics.observe_recorded,
    )
    metrics.serve(settings.worker_metrics_port, classifier.name, classifier.device, load_s)
    return Runtime(processor, batcher, classifier.name, classifier.device)
