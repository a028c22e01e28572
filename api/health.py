"""Liveness, readiness and the OpenAPI document."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, current_app

from api import contract as c
from api.services import services
from batchvision.core import documents as d
from batchvision.core.errors import ServiceUnavailable
from batchvision.server.queue import check_broker

bp = Blueprint("health", __name__)
log = logging.getLogger(__name__)


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
        raise _unready("Redis", "redis_unreachable", exc) from exc
    # -- a broker other than Redis (RabbitMQ) must accept a connection too ---------
    try:
        check_broker(services().settings)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        raise _unready("the broker", "broker_unreachable", exc) from exc
    return {"status": "ready", "pending_images": services().telemetry.pending_images()}


def _unready(what: str, code: str, exc: Exception) -> ServiceUnavailable:
    """The 503 of an unreachable dependency. The route answers without a key, so the error's
    text (host names, addresses of the internal network) goes to the log, not the answer."""
    log.warning("not ready: %s is unreachable: %s", what, exc)
    return ServiceUnavailable(
        f"{what} is unreachable ({type(exc).__name__}; the API's log has the detail)", code=code
    )


@bp.get("/openapi.json")
@c.contract(
    summary="This document: OpenAPI 3.1, generated from the routes and their models",
    responses={200: c.Response("The OpenAPI document", schema={"type": "object"})},
    v1=False,
    tags=("operations",),
)
def openapi() -> dict[str, Any]:
    return c.openapi(current_app)
