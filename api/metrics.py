"""API metrics. Under gunicorn (several worker processes) prometheus-client's multiprocess
mode aggregates them: gunicorn's master (``api.gunicorn_conf``) sets
``PROMETHEUS_MULTIPROC_DIR``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector

from api.contract import Response as Response_
from api.contract import contract
from batchvision.core.settings import Settings
from batchvision.server.intake import Submitted
from batchvision.server.queue import amqp_lengths
from batchvision.server.telemetry import Telemetry

JOBS_CREATED = Counter("batchvision_jobs_created_total", "Jobs created.")
IMAGES_ACCEPTED = Counter(
    "batchvision_images_accepted_total",
    "Images accepted and queued (each once, also when a part is re-sent).",
)
IMAGES_REJECTED = Counter(
    "batchvision_images_rejected_total", "Uploaded files refused at the API, by reason.", ["reason"]
)
REQUEST_SECONDS = Histogram(
    "batchvision_http_request_duration_seconds",
    "HTTP request latency by route, method and status.",
    ["route", "method", "status"],
    # Past 30 s: a `POST /v1/classify` may wait up to SYNC_TIMEOUT_S, uploads take minutes.
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
#: What ``generate_latest`` writes: the text format every Prometheus reads (2.x and 3.x).
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
#: The methods the latency histogram names; any other is counted as ``OTHER`` (each label value
#: is a series in every process and in Prometheus: a client must not be able to make more).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def count_submitted(submitted: Submitted, *, created: bool) -> None:
    """One submit's share of the counters, whatever the route (``/v1`` uploads, URLs, buckets,
    ``/v2`` inference): the job if it ``created`` one, its new images (a re-sent part's are
    counted once, with the part that first brought them), the files it refused."""
    if created:
        JOBS_CREATED.inc()
    IMAGES_ACCEPTED.inc(submitted.accepted)
    for item in submitted.rejected:
        IMAGES_REJECTED.labels(item.code).inc()


class StoreCollector(Collector):
    """Gauges read from Redis at scrape time: the same value from every API replica."""

    NAMES = ("batchvision_queue_depth_images", "batchvision_jobs_in_progress", "batchvision_queue_tasks")

    def __init__(
        self,
        telemetry: Telemetry,
        queues: tuple[str, ...],
        model_queues: Callable[[], dict[str, tuple[str, ...]]] | None = None,
        amqp: Settings | None = None,
    ) -> None:
        self.telemetry = telemetry
        self.queues = queues
        self.model_queues = model_queues  # one series per model
        self.amqp = amqp  # RabbitMQ is the broker: its queues, not Redis lists, hold the messages

    def _lengths(self, queues: list[str]) -> list[int]:
        """Messages waiting in each queue: Redis list lengths, or RabbitMQ's ready messages."""
        if self.amqp is not None:
            return amqp_lengths(self.amqp, queues)
        pipe = self.telemetry.redis.pipeline(transaction=False)
        for q in queues:
            pipe.llen(q)
        return [int(n) for n in pipe.execute()]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "batchvision_queue_depth_images",
            "Accepted images without a result yet (all jobs).",
            value=self.telemetry.pending_images(),
        )
        yield GaugeMetricFamily(
            "batchvision_jobs_in_progress",
            "Jobs created and not finished.",
            value=self.telemetry.active_jobs(),
        )
        help_text = (
            "Celery messages waiting in the broker's queues (Redis lists or RabbitMQ queues), bulk "
            "and interactive, not yet taken by a worker (what KEDA scales on)."
        )
        if self.model_queues is None:
            yield GaugeMetricFamily(
                "batchvision_queue_tasks", help_text, value=sum(self._lengths(list(self.queues)))
            )
            return
        by_model = self.model_queues()
        lengths = iter(self._lengths([q for queues in by_model.values() for q in queues]))
        family = GaugeMetricFamily("batchvision_queue_tasks", help_text + " By model.", labels=["model"])
        for model, queues in by_model.items():
            family.add_metric([model], sum(next(lengths) for _ in queues))
        yield family


def init_app(
    app: Flask,
    telemetry: Telemetry,
    queues: tuple[str, ...],
    model_queues: Callable[[], dict[str, tuple[str, ...]]] | None = None,
    amqp: Settings | None = None,
) -> None:
    """Time every request and serve ``/metrics`` (``model_queues``: the queue gauge by model;
    ``amqp``: the settings of a RabbitMQ broker, whose queues the gauge reads)."""
    store_registry = CollectorRegistry(auto_describe=False)
    store_registry.register(StoreCollector(telemetry, queues, model_queues, amqp))

    @app.before_request
    def _start() -> None:
        g.bv_start = time.perf_counter()

    @app.after_request
    def _observe(resp: Response) -> Response:
        start = g.pop("bv_start", None)
        if start is not None and request.endpoint != "metrics":
            route = request.url_rule.rule if request.url_rule else "unmatched"
            method = request.method if request.method in METHODS else "OTHER"
            REQUEST_SECONDS.labels(route, method, str(resp.status_code)).observe(time.perf_counter() - start)
        return resp

    @contract(
        summary="Prometheus metrics of the API (all gunicorn workers) and the queue gauges",
        responses={
            200: Response_("Prometheus text format", content_type="text/plain", schema={"type": "string"})
        },
        v1=False,
        tags=("operations",),
    )
    def metrics() -> Response:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        else:
            registry = REGISTRY
        body = generate_latest(registry)
        try:
            body += generate_latest(store_registry)
        except Exception:  # noqa: BLE001 - Redis down: the process metrics still serve
            pass
        # The Content-Type as it is, not a mimetype: Flask would add a second `charset`, and
        # Prometheus 3 fails a scrape whose Content-Type does not parse.
        return Response(body, headers={"Content-Type": TEXT_FORMAT})

    app.add_url_rule("/metrics", "metrics", metrics)
