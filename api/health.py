"""Liveness, readiness and the OpenAPI document."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app

from api import contract as c
from api.services import services
from batchvision.core import documents as d
from batchvision.core.errors import ServiceUnavailable
from batchvision.server.queue import check_broker

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@c.contract(
    summary="Liveness: the process answers (no dependency checked)",
    responses={200: c.Response("Alive", d.Health)},
    v1=False,
    tags=("operations",),
)
def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@bp.get("/readyz")
@c.contract(
    summary="Readiness: Redis (and a RabbitMQ broker) answer (else 503, and the load balancer "
    "sends traffic elsewhere)",
    responses={
        200: c.Response("Ready", d.Ready),
        503: c.Response("Redis or the broker is unreachable", d.ErrorDocument, headers=("Retry-After",)),
    },
    v1=False,
    tags=("operations",),
)
def readyz() -> dict[str, Any]:
    try:
        services().redis.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        raise ServiceUnavailable(f"Redis is unreachable: {exc}", code="redis_unreachable") from exc
    # -- a broker other than Redis (RabbitMQ) must accept a connection too ---------
    try:
        check_broker(services().settings)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        raise ServiceUnavailable(f"the broker is unreachable: {exc}", code="broker_unreachable") from exc
    return {"status": "ready", "pending_images": services().telemetry.pending_images()}


@bp.get("/openapi.json")
@c.contract(
    summary="This document: OpenAPI 3.1, generated from the routes and their models",
    responses={200: c.Response("The OpenAPI document", schema={"type": "object"})},
    v1=False,
    tags=("operations",),
)
def openapi() -> dict[str, Any]:
    return c.openapi(current_app)
