"""The worker process as an ordered list of components (see :mod:`workers.lifecycle`):

====================  ==============================================  ===========================
component             start                                           stop
====================  ==============================================  ===========================
``tracing``           OpenTelemetry, when configured                  flush the spans
``gpu``               check the pinned GPU is visible; NVML metrics   stop the GPU metrics
``redis``             connect; check settings, warn about eviction    close the connections
``liveness``          Redis broker only: this process's liveness key  stop renewing it (it lapses)
                      in Redis, renewed every heartbeat
``models``            load and warm up every model served, its lane;  close every lane's batcher
                      pinned to a GPU: refuse models on the CPU
``model-reporting``   registry, heartbeat, watcher, reload listener   leave the registry
``hand-on``           the publisher for chunks of other models        close it
``processor``         the chunk processor (decode and fetch pools)    shut the pools down
``metrics``           ``/metrics`` with each model's device           shut the server down
``webhooks``          the completion webhook deliverer                stop delivering
``dead-letters``      RabbitMQ only: the dead-letter queue consumer   stop consuming
``sweeper``           re-sends chunks whose message was lost, or      stop sweeping
                      whose worker died running them
====================  ==============================================  ===========================

Started in this order when the Celery worker starts (before it consumes), stopped in reverse
when it shuts down, or at once if a start fails. :class:`Worker` is the composition root; the
Celery app holds it (:mod:`workers.celery_app`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery

from batchvision.core.allow_list import AllowList
from batchvision.core.batching import BatchInfo
from batchvision.core.results import error_result
from batchvision.core.settings import Settings
from batchvision.server import tracing
from batchvision.server.blobs import BlobStore, open_blobs, reap_kept
from batchvision.server.checks import check_worker_settings, eviction_warning
from batchvision.server.claims import Claims
from batchvision.server.connect import connect_redis
from batchvision.server.deadletter import DeadLetterConsumer, DeadLetters
from batchvision.server.exports import Exporter
from batchvision.server.fetch import Fetcher, SafeHTTP
from batchvision.server.gpus import GpuReader, NoGpus, Nvml, describe, require_gpu, visible
from batchvision.server.intake import Intake
from batchvision.server.listing import Lister
from batchvision.server.liveness import Liveness, Orphans, grace_s
from batchvision.server.messages import Chunk
from batchvision.server.pipeline import ChunkProcessor, ProcessorLimits
from batchvision.server.queue import (
    Enqueuer,
    amqp_backlog,
    create_celery,
    dead_letter_queue,
    publish,
    uses_amqp,
)
from batchvision.server.recovery import (
    Sweeper,
    backlog_of,
    list_backlog,
    recover_parts,
    resend_failed,
    resolve_chunks,
    sweep,
)
from batchvision.server.registry import ModelRegistry
from batchvision.server.routing import default_model, model_queues
from batchvision.server.s3 import S3Config, S3Url, shared
from batchvision.server.store import JobStore
from batchvision.server.telemetry import BatchLog, Telemetry
from batchvision.server.webhooks import Deliverer
from workers import metrics
from workers.lifecycle import Component, Lifecycle, NotStarted, StartError
from workers.manager import ModelLane, ModelManager
from workers.reporting import ModelReporter

log = logging.getLogger(__name__)


def _made(value: Any, component: str) -> Any:
    if value is None:
        raise NotStarted(f"the {component} component has not started")
    return value


class TracingStep:
    name = "tracing"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def start(self) -> None:
        tracing.setup("batchvision-worker", self.settings)  # a no-op unless configured

    def stop(self) -> None:
        tracing.flush()


class GpuStep:
    """A worker pinned to a GPU (``BATCHVISION_GPU``, set by ``batchvision worker --gpu``) stops
    here when that GPU is not visible, instead of running on the CPU; and the GPUs this process
    may use (``CUDA_VISIBLE_DEVICES``) are exported as metrics where NVML shows any."""

    name = "gpu"

    def __init__(self, settings: Settings, open_reader: Callable[[], GpuReader] = Nvml) -> None:
        self.settings = settings
        self.open_reader = open_reader
        self._reader: GpuReader | None = None
        self._collector: metrics.GpuCollector | None = None

    def start(self) -> None:
        try:
            reader = self.open_reader()
        except NoGpus as exc:
            if self.settings.gpu:
                require_gpu(self.settings.gpu, None)  # raises, naming the GPU and why none is visible
            log.info("no GPU metrics: %s", exc)
            return
        self._reader = reader
        if self.settings.gpu:
            require_gpu(self.settings.gpu, reader)
        gpus = visible(reader.gpus(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        self._collector = metrics.watch_gpus(reader, gpus)
        log.info("GPUs of this worker: %s", describe(gpus))

    def stop(self) -> None:
        if self._collector is not None:
            metrics.REGISTRY.unregister(self._collector)
        if self._reader is not None:
            self._reader.close()


class RedisStep:
    """The Redis client and what is built on it alone: job store, claims, blobs."""

    name = "redis"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: Any = None
        self.store: JobStore | None = None
        self.claims: Claims | None = None
        self.blobs: BlobStore | None = None

    def start(self) -> None:
        s = self.settings
        check_worker_settings(s)
        client = connect_redis(s.redis_url)
        warning = eviction_warning(client)
        if warning:
            log.warning(warning)
        self._client = client
        self.store = JobStore(client, result_ttl_s=s.result_ttl_s, blob_ttl_s=s.blob_ttl_s)
        self.claims = Claims(client, ttl_s=s.blob_ttl_s)
        self.blobs = open_blobs(s.blob_url, client, s.blob_ttl_s, S3Config.from_settings(s))

    @property
    def client(self) -> Any:
        return _made(self._client, self.name)

    def stop(self) -> None:
        self._client.close()


def batch_hook(batch_log: BatchLog) -> Callable[[ModelLane], Callable[[BatchInfo], None]]:
    """The batch hook of each model's lane: metrics, the recent-batches log, the batch's span
    (linked to its tasks) and a log line."""

    def on_batch_for(lane: ModelLane) -> Callable[[BatchInfo], None]:
        def on_batch(info: BatchInfo) -> None:
            version = lane.last.version if lane.last is not None else None
            metrics.observe_batch(info, lane.model)
            jobs = [str(tag[0]) for tag in info.tags]
            batch_log.put(info.size, jobs, lane.model, version)
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

    return on_batch_for


def devices(manager: ModelManager) -> dict[str, str]:
    """The device each served model runs on (model name -> device)."""
    return {name: s.live.classifier.device for name, s in manager.models.items()}


class ModelsStep:
    """The models this worker serves (``BATCHVISION_WORKER_MODELS``, default every model of
    the repository), each with its lane. Raises if a model cannot load at all."""

    name = "models"

    def __init__(self, settings: Settings, redis: RedisStep) -> None:
        self.settings = settings
        self.redis = redis
        self._manager: ModelManager | None = None
        self.load_s = 0.0

    def start(self) -> None:
        begin = time.perf_counter()
        hook = batch_hook(BatchLog(Telemetry(self.redis.client)))  # the model thread never waits on Redis
        manager = ModelManager(
            self.settings,
            pointer=ModelRegistry(self.redis.client).live_pointer,  # the operator's rollback
            on_batch_for=hook,
            on_switch=metrics.observe_switch,
        )
        manager.start()
        self.load_s = time.perf_counter() - begin
        on_cpu = [
            f"{name} ({device})" for name, device in devices(manager).items() if "cpu" in device.lower()
        ]
        if self.settings.gpu and on_cpu:
            manager.close()  # a failed start is not stopped by the lifecycle
            raise RuntimeError(
                f"pinned to GPU {self.settings.gpu}, but these models run on the CPU: {', '.join(on_cpu)}; "
                "is the GPU build of the backend installed "
                f"(BATCHVISION_KERAS_BACKEND={self.settings.keras_backend})?"
            )
        self._manager = manager

    @property
    def manager(self) -> ModelManager:
        manager: ModelManager = _made(self._manager, self.name)
        return manager

    def stop(self) -> None:
        self.manager.close()


class ReportingStep:
    """What the worker tells the model registry and hears from it: versions, heartbeats,
    new version folders (the watcher) and reload requests (pub/sub)."""

    name = "model-reporting"

    def __init__(self, redis: RedisStep, models: ModelsStep) -> None:
        self.redis = redis
        self.models = models
        self.reporter: ModelReporter | None = None

    def start(self) -> None:
        self.reporter = ModelReporter(self.models.manager, ModelRegistry(self.redis.client))
        self.reporter.start()

    def stop(self) -> None:
        _made(self.reporter, self.name).close()


class HandOnStep:
    """Publishes a chunk of a model this worker does not serve to that model's queues."""

    name = "hand-on"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._app: Celery | None = None

    def start(self) -> None:
        # No connection yet: the broker is reached on the first hand-on (a chunk of another
        # model, or a parked chunk of URLs sent back).
        self._app = create_celery(self.settings, name="batchvision-worker-hand-on")

    def __call__(
        self, chunk: Chunk, model: str, urgent: bool, priority: int, enqueued_at: float | None = None
    ) -> None:
        app = _made(self._app, self.name)
        when = time.time() if enqueued_at is None else enqueued_at
        publish(app, self.settings, [chunk], when, urgent, model=model, priority=priority)

    def stop(self) -> None:
        _made(self._app, self.name).close()


class LivenessStep:
    """Redis broker only: this worker process's liveness key (:class:`~batchvision.server.liveness.Liveness`),
    so that the chunks it runs are sent again soon after it dies, not after the visibility
    timeout (RabbitMQ gives a dead worker's messages back at once)."""

    name = "liveness"

    def __init__(self, settings: Settings, redis: RedisStep) -> None:
        self.settings = settings
        self.redis = redis
        #: This process's id: the host and pid say whose it is, the random part tells a restarted
        #: container (the same host name and pid) from the one that died.
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._liveness: Liveness | None = None

    def start(self) -> None:
        self._liveness = Liveness(self.redis.client, self.worker, self.settings.worker_heartbeat_s)
        self._liveness.start()

    def stop(self) -> None:
        _made(self._liveness, self.name).stop()


class ProcessorStep:
    name = "processor"

    def __init__(
        self,
        settings: Settings,
        redis: RedisStep,
        models: ModelsStep,
        hand_on: HandOnStep,
        liveness: LivenessStep | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.models = models
        self.hand_on = hand_on
        self.liveness = liveness
        self._processor: ChunkProcessor | None = None

    def start(self) -> None:
        r = self.redis
        self._processor = ChunkProcessor(
            store=_made(r.store, r.name),
            claims=_made(r.claims, r.name),
            blobs=_made(r.blobs, r.name),
            lanes=self.models.manager,
            default_model=default_model(self.settings),
            limits=ProcessorLimits.from_settings(self.settings),
            fetcher=Fetcher.from_settings(self.settings),
            s3=lambda: shared(S3Config.from_settings(self.settings)),
            hand_on=self.hand_on,
            on_decode=metrics.DECODE.observe,
            on_recorded=metrics.observe_recorded,
            taker=self.liveness.worker if self.liveness is not None else None,
        )
        metrics.PARKED.set_function(self._processor.parked)

    @property
    def processor(self) -> ChunkProcessor:
        processor: ChunkProcessor = _made(self._processor, self.name)
        return processor

    def stop(self) -> None:
        self.processor.close()


class MetricsStep:
    name = "metrics"

    def __init__(self, settings: Settings, models: ModelsStep) -> None:
        self.settings = settings
        self.models = models
        self._server: Any = None

    def start(self) -> None:
        s = self.settings
        try:
            self._server = metrics.serve(
                s.worker_metrics_port, devices(self.models.manager), self.models.load_s, s.worker_metrics_host
            )
        except OSError as exc:  # the port taken (two workers on one host), a host it cannot bind
            raise StartError(
                f"the metrics endpoint cannot listen on {s.worker_metrics_host}:{s.worker_metrics_port} "
                f"({exc}): set BATCHVISION_WORKER_METRICS_PORT to a free port (each worker of a host "
                "its own; 0 turns the endpoint off) or BATCHVISION_WORKER_METRICS_HOST to an address "
                "of this host"
            ) from exc

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class WebhooksStep:
    """Every worker process delivers completion webhooks; pending ones live in Redis, so a
    worker killed mid-delivery leaves its lease to expire and another one sends it."""

    name = "webhooks"

    def __init__(self, settings: Settings, redis: RedisStep) -> None:
        self.settings = settings
        self.redis = redis
        self._deliverer: Deliverer | None = None

    def start(self) -> None:
        s = self.settings
        http = SafeHTTP(AllowList.parse(s.webhook_allow), connect_timeout_s=s.fetch_connect_timeout_s)
        self._deliverer = Deliverer(self.redis.client, s, http)
        self._deliverer.start()

    def stop(self) -> None:
        _made(self._deliverer, self.name).stop()


class ExportsStep:
    """Every worker process writes the output files of finished jobs that name an output
    prefix; due ones live in Redis, so a worker killed mid-write leaves its lease to expire
    and another one writes the whole output again."""

    name = "exports"

    def __init__(self, settings: Settings, redis: RedisStep) -> None:
        self.settings = settings
        self.redis = redis
        self._exporter: Exporter | None = None

    def start(self) -> None:
        s = self.settings
        r = self.redis
        self._exporter = Exporter(
            r.client,
            _made(r.store, r.name),
            lambda: shared(S3Config.from_settings(s)),
            s.output_formats.split(","),
            retry_for_s=float(s.result_ttl_s),
        )
        self._exporter.start()

    def stop(self) -> None:
        _made(self._exporter, self.name).stop()


class ListingsStep:
    """Every worker process lists on the jobs made from an ``s3://`` prefix that has more than
    the request listed, a page at a time (:mod:`batchvision.server.listing`)."""

    name = "listings"

    def __init__(self, settings: Settings, app: Celery, redis: RedisStep) -> None:
        self.settings = settings
        self.app = app
        self.redis = redis
        self._lister: Lister | None = None

    def start(self) -> None:
        s = self.settings
        r = self.redis
        store = _made(r.store, r.name)
        blobs = _made(r.blobs, r.name)
        intake = Intake(s, r.client, store, blobs, Telemetry(r.client), Enqueuer(self.app, s))

        def add_listed(job_id: str, owner: str, url: S3Url, keys: Sequence[str]) -> int:
            added = intake.add_listed(job_id, owner, url, keys)
            metrics.IMAGES_LISTED.inc(added)
            return added

        self._lister = Lister(
            r.client,
            store,
            lambda: shared(S3Config.from_settings(s)),
            add_listed,
            page_size=s.listing_page(),
            max_images=s.max_objects_per_job,
            ahead=s.list_ahead,
            # A dead worker's listing moves on about when its tasks would be redelivered.
            lease_s=min(60.0, float(s.visibility_timeout_s)),
        )
        self._lister.start()

    def stop(self) -> None:
        _made(self._lister, self.name).stop()


class DeadLettersStep:
    """RabbitMQ only: the consumer of the dead-letter queue (failed, over-limit messages)."""

    name = "dead-letters"

    def __init__(self, settings: Settings, redis: RedisStep) -> None:
        self.settings = settings
        self.redis = redis
        self._consumer: DeadLetterConsumer | None = None

    def start(self) -> None:
        r = self.redis
        handler = DeadLetters(
            self.settings, _made(r.store, r.name), _made(r.claims, r.name), _made(r.blobs, r.name)
        )
        self._consumer = DeadLetterConsumer(handler)
        self._consumer.start()

    def stop(self) -> None:
        _made(self._consumer, self.name).stop()


class SweeperStep:
    """Re-sends chunks whose message a dead worker took with it (:mod:`batchvision.server.recovery`;
    a chunk waits while its model's queues have a backlog, and on RabbitMQ, where none is lost
    that way, the sweep runs only while the dead-letter queue is empty), chunks marked failed
    (a task gave up on them, or the API could not publish them), the images of parts whose
    request failed before their chunks were recorded, and (Redis broker) the chunks of
    workers that died running them."""

    name = "sweeper"

    def __init__(
        self,
        settings: Settings,
        app: Celery,
        redis: RedisStep,
        processor: ProcessorStep,
        liveness: LivenessStep | None = None,
    ) -> None:
        self.settings = settings
        self.app = app
        self.redis = redis
        self.processor = processor
        self.liveness = liveness
        self._sweeper: Sweeper | None = None
        self._orphans: Orphans | None = None

    def _resend(self, chunk: Chunk) -> None:
        store = _made(self.redis.store, self.redis.name)
        routing = store.routing_of(chunk.job_id)  # to its model's queue of its priority's tier
        publish(self.app, self.settings, [chunk], time.time(), model=routing.model, priority=routing.priority)

    def _run(self) -> int:
        # This process's parked chunks are waiting, not lost: no sweep (of any worker) re-sends them.
        self.processor.processor.touch_parked()
        store: JobStore = _made(self.redis.store, self.redis.name)
        recover_parts(store, self._resend, self.settings.chunk_size)  # never in any queue: not held back

        def queues_of(model: str | None) -> tuple[str, ...]:
            name = model or default_model(self.settings)
            return model_queues(self.settings, [name])[name]

        if uses_amqp(self.settings):
            # Messages waiting in the dead-letter queue are its consumer's to re-send.
            if amqp_backlog(self.settings, [dead_letter_queue(self.settings)]):
                return 0
            backlog = backlog_of(queues_of, lambda queues: bool(amqp_backlog(self.settings, queues)))
        else:
            backlog = list_backlog(self.redis.client, queues_of)
        # Twice the visibility timeout: kombu's own restore gets the first chance.
        return sweep(store, backlog, 2 * self.settings.visibility_timeout_s + 2.0, self._resend)

    def _give_up(self, chunk: Chunk, failures: int) -> None:
        text = f"classifying this image failed {failures} times; see the worker logs"
        r = self.redis
        store, claims, blobs = _made(r.store, r.name), _made(r.claims, r.name), _made(r.blobs, r.name)
        resolve_chunks(store, claims, blobs, [chunk], error_result("task_failed", text))

    def _run_failed(self) -> int:
        # Chunks a task gave up on (Redis broker; RabbitMQ dead-letters those) and chunks the
        # API could not publish (either broker).
        store = _made(self.redis.store, self.redis.name)
        resent = resend_failed(store, self._resend, self._give_up)
        if self._orphans is not None:  # a dead worker's chunks (RabbitMQ gives them back itself)
            resent += self._orphans()
        blobs = _made(self.redis.blobs, self.redis.name)
        if not blobs.expiring:  # a file or S3 store: the blobs kept for a retry whose time is up
            reap_kept(self.redis.client, blobs)
        return resent

    def start(self) -> None:
        if self.liveness is not None:
            self._orphans = Orphans(
                _made(self.redis.store, self.redis.name),
                self._resend,
                me=self.liveness.worker,
                grace_s=grace_s(self.settings.worker_heartbeat_s),
            )
        self._sweeper = Sweeper(
            max(1.0, min(60.0, self.settings.visibility_timeout_s / 3)), self._run, self._run_failed
        )
        self._sweeper.start()

    def stop(self) -> None:
        _made(self._sweeper, self.name).stop()


class Worker:
    """The composition root of one worker process: its components, in start order."""

    def __init__(self, settings: Settings, app: Celery) -> None:
        self.settings = settings
        self.redis = RedisStep(settings)
        self.models = ModelsStep(settings, self.redis)
        hand_on = HandOnStep(settings)
        liveness = None if uses_amqp(settings) else LivenessStep(settings, self.redis)
        self._processor = ProcessorStep(settings, self.redis, self.models, hand_on, liveness)
        components: list[Component] = [
            TracingStep(settings),
            GpuStep(settings),
            self.redis,
            *([liveness] if liveness is not None else []),
            self.models,
            ReportingStep(self.redis, self.models),
            hand_on,
            self._processor,
            MetricsStep(settings, self.models),
            WebhooksStep(settings, self.redis),
            ExportsStep(settings, self.redis),
            ListingsStep(settings, app, self.redis),
        ]
        if uses_amqp(settings):
            components.append(DeadLettersStep(settings, self.redis))
        components.append(SweeperStep(settings, app, self.redis, self._processor, liveness))
        self.lifecycle = Lifecycle(components)

    def start(self) -> None:
        self.lifecycle.start()
        log.info("worker started: %s", ", ".join(self.lifecycle.started))

    def stop(self) -> None:
        self.lifecycle.stop()

    @property
    def processor(self) -> ChunkProcessor:
        return self._processor.processor

    @property
    def model_names(self) -> str:
        """The models served, comma-separated (span attribute)."""
        return ",".join(self.models.manager.names())
