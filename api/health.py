"""Liveness, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from api.openapi import document
from api.services import services
from batchvision.core.errors import ServiceUnavailable

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> dict[str, Any]:
    """The process is alive (no dependencies checked)."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> dict[str, Any]:
    """Ready when Redis answers: otherwise 503, and the load balancer sends traffic elsewhere."""
    try:
        services().redis.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        raise ServiceUnavailable(f"Redis is unreachable: {exc}", code="redis_unreachable") from exc
    return {"status": "ready", "pending_images": services().telemetry.pending_images()}


@bp.get("/openapi.json")
def openapi() -> dict[str, Any]:
    return document()
