"""API keys and per-key rate limits.

``BATCHVISION_API_KEYS`` holds keys or, better, their SHA-256 hex digests: only digests are
kept in memory and compared, so a leaked config or memory dump does not leak usable keys.
When keys are configured every ``/v1`` route needs one (``Authorization: Bearer <key>`` or
``X-API-Key``), and a job is visible only to the key that created it. Rate limits are a
fixed window per key and minute in Redis, so all API replicas share them.
"""

from __future__ import annotations

import hashlib
import re
import time

from flask import Flask, g, request

from api.services import services
from batchvision.core.errors import TooManyRequests, Unauthorized
from batchvision.server import keys

_HEX64 = re.compile(r"[0-9a-f]{64}")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(raw: str) -> frozenset[str]:
    """Configured keys as SHA-256 digests (a 64-hex entry is taken as a digest already)."""
    items = [k.strip() for k in raw.split(",") if k.strip()]
    return frozenset(k if _HEX64.fullmatch(k) else digest(k) for k in items)


def presented_key() -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("X-API-Key") or None


def current_owner() -> str:
    """Who owns what this request creates: a prefix of the key's digest, or '' without auth."""
    return str(g.get("bv_owner", ""))


def init_app(app: Flask, api_keys: str) -> None:
    allowed = parse_keys(api_keys)

    @app.before_request
    def _authenticate() -> None:
        if not request.path.startswith(("/v1/", "/v2/models")):  # /v2/health stays open
            return
        g.bv_owner = ""
        if not allowed:
            return
        key = presented_key()
        if key is None:
            raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key'")
        d = digest(key)
        if d not in allowed:
            raise Unauthorized("invalid API key", code="invalid_api_key")
        g.bv_owner = d[:16]
        _rate_limit(g.bv_owner)


def _rate_limit(owner: str) -> None:
    svc = services()
    limit = svc.settings.rate_limit_per_minute
    if not limit:
        return
    now = time.time()
    window = int(now // 60)
    key = keys.rate(owner, window)
    pipe = svc.redis.pipeline()
    pipe.incr(key)
    pipe.expire(key, 120)
    count = int(pipe.execute()[0])
    if count > limit:
        raise TooManyRequests(
            f"rate limit of {limit} requests per minute exceeded for this API key",
            code="rate_limited",
            retry_after=max(1, int(60 - now % 60)),
        )
