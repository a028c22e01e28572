"""What request handlers share: settings, Redis, the job and blob stores, the producer."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from celery import Celery
from flask import current_app

from batchvision.blobs import BlobStore, open_blobs
from batchvision.queue import create_celery
from batchvision.services import connect_redis
from batchvision.settings import Settings
from batchvision.store import JobStore


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    store: JobStore
    blobs: BlobStore
    celery: Celery

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
        return cls(
            settings=settings,
            redis=client,
            store=JobStore(client, result_ttl_s=settings.result_ttl_s, blob_ttl_s=settings.blob_ttl_s),
            blobs=open_blobs(settings.blob_url, client, settings.blob_ttl_s),
            celery=celery,
        )


def services() -> Services:
    """The current app's services."""
    svc: Services = current_app.extensions["batchvision"]
    return svc
