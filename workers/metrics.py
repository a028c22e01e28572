"""Worker metrics (prometheus-client), served on ``BATCHVISION_WORKER_METRICS_PORT``.

One worker is one process (threads pool), so the default registry is exact here.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

from batchvision.core.batching import BatchInfo
from batchvision.server.store import Counts

IMAGES = Counter(
    "batchvision_images_classified_total",
    "Images given a stored result by this worker, by outcome (ok, error, canceled).",
    ["outcome"],
)
BATCH_SIZE = Histogram(
    "batchvision_batch_size",
    "Images per model call.",
    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128),
)
INFERENCE = Histogram(
    "batchvision_inference_seconds",
    "Seconds per model call (one batch).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DECODE = Histogram(
    "batchvision_decode_seconds",
    "Seconds to decode and resize one image.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
QUEUE_WAIT = Histogram(
    "batchvision_queue_wait_seconds",
    "Seconds from upload (enqueue) to the start of the image's batch.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
MODEL_LOAD = Gauge("batchvision_model_load_seconds", "Seconds it took to load and warm up the model.")
MODEL = Info("batchvision_model", "The model this worker serves and the device it runs on.")


def observe_batch(info: BatchInfo) -> None:
    """Batcher hook: size, model time and the queue wait of every image in the batch."""
    BATCH_SIZE.observe(info.size)
    INFERENCE.observe(info.run_s)
    started = time.time() - info.run_s
    for tag in info.tags:
        enqueued_at = tag[1] if isinstance(tag, tuple) and len(tag) > 1 else None
        if enqueued_at:
            QUEUE_WAIT.observe(max(0.0, started - float(enqueued_at)))


def observe_recorded(counts: Counts) -> None:
    """Count only results that were newly stored: exact under redelivery."""
    for outcome, n in (("ok", counts.done), ("error", counts.failed), ("canceled", counts.canceled)):
        if n:
            IMAGES.labels(outcome).inc(n)


def serve(port: int, model: str, device: str, load_s: float) -> None:
    """Start the ``/metrics`` endpoint (a daemon thread) with the model's info set."""
    MODEL.info({"model": model, "device": device})
    MODEL_LOAD.set(load_s)
    for outcome in ("ok", "error", "canceled"):
        IMAGES.labels(outcome)
    if port:
        start_http_server(port)
