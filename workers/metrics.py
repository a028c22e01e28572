"""Worker metrics (prometheus-client), served on ``BATCHVISION_WORKER_METRICS_PORT``.

One worker is one process (threads pool), so the default registry is exact here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from batchvision.core.batching import BatchInfo
from batchvision.server.gpus import Gpu, GpuReader, GpuSample
from batchvision.server.store import Counts

log = logging.getLogger(__name__)

IMAGES = Counter(
    "batchvision_images_classified_total",
    "Images given a stored result by this worker, by model and outcome (ok, error, canceled).",
    ["model", "outcome"],
)
#: The images of the pages workers list of a prefix job; the API counts those of its requests
#: (the first page included) in batchvision_images_accepted_total: every image accepted is the sum.
IMAGES_LISTED = Counter(
    "batchvision_images_listed_total",
    "Images of prefix jobs this worker listed and queued (the pages after the first).",
)
BATCH_SIZE = Histogram(
    "batchvision_batch_size",
    "Images per model call, by model.",
    ["model"],
    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128),
)
INFERENCE = Histogram(
    "batchvision_inference_seconds",
    "Seconds per model call (one batch), by model.",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DECODE = Histogram(
    "batchvision_decode_seconds",
    "Seconds to decode and resize one image.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
QUEUE_WAIT = Histogram(
    "batchvision_queue_wait_seconds",
    "Seconds from upload (enqueue) to the start of the image's batch, by model.",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
PARKED = Gauge(
    "batchvision_worker_parked_chunks",
    "Chunks of image URLs this worker parked because their API key runs its share of messages "
    "already (FETCH_PER_KEY); published again as the key's messages finish here, and at a stop.",
)
MODEL_LOAD = Gauge(
    "batchvision_model_load_seconds", "Seconds it took to load and warm up the models at start."
)
MODEL = Info("batchvision_model", "A model this worker serves and the device it runs on.", ["model"])
# -- versions and reloads -----------------------------------------------------------
LIVE_VERSION = Gauge(
    "batchvision_model_live_version", "The version of each model this worker has live.", ["model"]
)
RELOADS = Counter(
    "batchvision_model_reloads_total",
    "Versions loaded to go live (ok) or refused (failed), by model.",
    ["model", "outcome"],
)
RELOAD_SECONDS = Gauge(
    "batchvision_model_reload_seconds",
    "Seconds the last version to go live took to load and check.",
    ["model"],
)


class GpuCollector(Collector):
    """The GPUs this worker uses, read through NVML at each scrape: utilisation and memory.
    Registered only where a GPU is visible, so a CPU worker exports no GPU series at all."""

    NAMES = (
        "batchvision_gpu_utilization_ratio",
        "batchvision_gpu_memory_used_bytes",
        "batchvision_gpu_memory_total_bytes",
    )
    HELP = (
        "Share of NVML's last sample period (1/6 s to 1 s) in which a kernel ran on the GPU.",
        "GPU memory in use, by every process on the GPU.",
        "GPU memory in all.",
    )

    def __init__(self, reader: GpuReader, gpus: list[Gpu]) -> None:
        self.reader = reader
        self.gpus = gpus

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = [
            GaugeMetricFamily(n, h, labels=["gpu", "uuid"])
            for n, h in zip(self.NAMES, self.HELP, strict=True)
        ]
        for gpu in self.gpus:
            try:
                sample: GpuSample = self.reader.sample(gpu)
            except Exception as exc:  # noqa: BLE001 - an NVML error must not fail the whole scrape
                log.warning("cannot read GPU %s: %s", gpu, exc)
                continue
            labels = [str(gpu.index), gpu.uuid]
            families[0].add_metric(labels, sample.utilization)
            families[1].add_metric(labels, sample.memory_used_bytes)
            families[2].add_metric(labels, sample.memory_total_bytes)
        yield from families


def watch_gpus(
    reader: GpuReader, gpus: list[Gpu], registry: CollectorRegistry = REGISTRY
) -> GpuCollector | None:
    """Export ``gpus`` through ``reader`` (nothing, and ``None``, without GPUs); unregister the
    returned collector to stop."""
    if not gpus:
        return None
    collector = GpuCollector(reader, gpus)
    registry.register(collector)
    return collector


def observe_batch(info: BatchInfo, model: str = "") -> None:
    """Batcher hook: size, model time and the queue wait of every image in the batch."""
    BATCH_SIZE.labels(model).observe(info.size)
    INFERENCE.labels(model).observe(info.run_s)
    started = time.time() - info.run_s
    for tag in info.tags:
        enqueued_at = tag[1] if isinstance(tag, tuple) and len(tag) > 1 else None
        if enqueued_at:
            QUEUE_WAIT.labels(model).observe(max(0.0, started - float(enqueued_at)))


def observe_recorded(counts: Counts, model: str = "") -> None:
    """Count only results that were newly stored: exact under redelivery."""
    for outcome, n in (("ok", counts.done), ("error", counts.failed), ("canceled", counts.canceled)):
        if n:
            IMAGES.labels(model, outcome).inc(n)


def observe_switch(model: str, version: int, load_s: float | None) -> None:
    """A version went live after ``load_s`` seconds (``None``: it was refused)."""
    if load_s is None:
        RELOADS.labels(model, "failed").inc()
        return
    RELOADS.labels(model, "ok").inc()
    RELOAD_SECONDS.labels(model).set(load_s)
    LIVE_VERSION.labels(model).set(version)


def serve(port: int, devices: dict[str, str], load_s: float, host: str = "0.0.0.0") -> WSGIServer | None:
    """Start the ``/metrics`` endpoint (a daemon thread) with each model's info set
    (``devices``: model -> device); returns its server (``None`` without a port)."""
    for model, device in devices.items():
        MODEL.labels(model).info({"device": device})
        for outcome in ("ok", "error", "canceled"):
            IMAGES.labels(model, outcome)
        for outcome in ("ok", "failed"):
            RELOADS.labels(model, outcome)
    MODEL_LOAD.set(load_s)
    if not port:
        return None
    server, _ = start_http_server(port, addr=host)
    return server
