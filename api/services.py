"""What request handlers share: settings, Redis, the stores, the intake, the producer."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from celery import Celery
from flask import current_app

from batchvision.core.settings import Settings
from batchvision.server.blobs import BlobStore, open_blobs
from batchvision.server.connect import connect_redis
from batchvision.server.idempotency import Idempotency
from batchvision.server.intake import Intake
from batchvision.server.queue import Enqueuer, create_celery
from batchvision.server.registry import ModelRegistry
from batchvision.server.s3 import S3Config
from batchvision.server.store import JobStore
from batchvision.server.telemetry import Telemetry
from batchvision.server.waiter import Waiter


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    store: JobStore
    blobs: BlobStore
    telemetry: Telemetry
    celery: Celery
    intake: Intake
    waiter: Waiter
    idempotency: Idempotency
    models: ModelRegistry  # what the workers serve (GET /v1/models, submit checks)

    @classmethod
    def create(cls, settings: Settings) -> Services:
        client = connect_redis(settings.redis_url)
        celery = create_celery(settings, name="batchvision-api")
        # Fail fast when Redis is down: the client gets a 503 instead of a hanging request.
        celery.conf.task_publish_retry_policy = {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        }
        store = JobStore(client, result_ttl_s=settings.result_ttl_s, blob_ttl_s=settings.blob_ttl_s)
        blobs = open_blobs(settings.blob_url, client, settings.blob_ttl_s, S3Config.from_settings(settings))
        telemetry = Telemetry(client)
        models = ModelRegistry(client)
        return cls(
            settings=settings,
            redis=client,
            store=store,
            blobs=blobs,
            telemetry=telemetry,
            celery=celery,
            intake=Intake(settings, client, store, blobs, telemetry, Enqueuer(celery, settings), models),
            waiter=Waiter(client, store.is_finished),
            idempotency=Idempotency(
                client, ttl_s=settings.idempotency_ttl_s, pending_ttl_s=int(settings.sync_timeout_s) + 60
            ),
            models=models,
        )


def services() -> Services:
    """The current app's services."""
    svc: Services = current_app.extensions["batchvision"]
    return svc
