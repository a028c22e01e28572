"""API keys and per-key rate limits.

``BATCHVISION_API_KEYS`` holds keys or, better, their SHA-256 hex digests: only digests are
kept in memory and compared, so a leaked config or memory dump does not leak usable keys.
When keys are configured every ``/v1`` route needs one (``Authorization: Bearer <key>`` or
``X-API-Key``), and a job is visible only to the key that created it. Rate limits are a
fixed window per key and minute in Redis, so all API replicas share them.

Two exposure guards run before any route: the ``Host`` header must be one of
``BATCHVISION_ALLOWED_HOSTS`` when that is set (a page on another site that rebinds its DNS
name to 127.0.0.1 still sends its own name as ``Host``, and gets ``400 bad_host``), and without
keys ``GET /v1/webhook-secret`` is refused (``403``): the secret would go to anyone who asks.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from flask import Flask, g, request

from api.services import services
from batchvision.core.errors import BadRequest, BatchvisionError, TooManyRequests, Unauthorized
from batchvision.core.settings import key_digest, owner_of
from batchvision.server import keys


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(raw: str) -> frozenset[str]:
    """Configured keys as SHA-256 digests (a 64-hex entry is taken as a digest already)."""
    items = [k.strip() for k in raw.split(",") if k.strip()]
    return frozenset(key_digest(k) for k in items)


def presented_key() -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("X-API-Key") or None


def current_owner() -> str:
    """Who owns what this request creates: a prefix of the key's digest, or '' without auth."""
    return str(g.get("bv_owner", ""))


class Forbidden(BatchvisionError):
    status = 403
    code = "forbidden"


#: Routes that answer whatever the ``Host``: the orchestrator's probes and Prometheus' scrapes
#: use the pod's address (none of them is routed from outside: see k8s/base/ingress.yaml).
HOST_EXEMPT = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"})
WEBHOOK_SECRET_ENDPOINT = "v1.webhook_secret"


@dataclass(frozen=True)
class HostAllowList:
    """``BATCHVISION_ALLOWED_HOSTS``: ``name`` (any port), ``name:port``, ``*.suffix``; IPv6 in
    brackets (``[::1]``). Empty: every ``Host`` is answered."""

    names: frozenset[str] = frozenset()
    with_port: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, raw: str) -> HostAllowList:
        names, with_port, suffixes = set(), set(), []
        for item in (i.strip().lower().rstrip(".") for i in raw.split(",")):
            if not item:
                continue
            if item.startswith("*."):
                suffixes.append(item[1:])
            elif _split_host(item)[1]:
                with_port.add(item)
            else:
                names.add(item)
        return cls(frozenset(names), frozenset(with_port), tuple(suffixes))

    def __bool__(self) -> bool:
        return bool(self.names or self.with_port or self.suffixes)

    def allows(self, header: str) -> bool:
        host = header.strip().lower()
        name, port = _split_host(host)
        name = name.rstrip(".")
        if not name or (port and not (port.isascii() and port.isdigit())):
            return False  # `name:1@evil.example`: a port is digits, else the links it makes break
        full = f"{name}:{port}" if port else name
        return name in self.names or full in self.with_port or any(name.endswith(s) for s in self.suffixes)


def _split_host(host: str) -> tuple[str, str]:
    """``(name, port)`` of a Host header value (``[v6]:port`` keeps its brackets)."""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return "", ""
        rest = host[end + 1 :]
        if rest and not rest.startswith(":"):
            return "", ""
        return host[: end + 1], rest[1:]
    name, _, port = host.partition(":")
    return name, port


def init_app(app: Flask, api_keys: str, allowed_hosts: str = "") -> None:
    allowed = parse_keys(api_keys)
    hosts = HostAllowList.parse(allowed_hosts)

    @app.before_request
    def _check_host() -> None:
        if not hosts or request.path in HOST_EXEMPT:
            return
        given = request.headers.get("Host", "")
        if not hosts.allows(given):
            raise BadRequest(
                f"Host {given[:100]!r} is not served here (BATCHVISION_ALLOWED_HOSTS lists the "
                "names this API answers to)",
                code="bad_host",
                details=[{"in": "header", "field": "Host", "value": given[:100]}],
            )

    @app.before_request
    def _authenticate() -> None:
        if not request.path.startswith(("/v1/", "/v2/models")):  # /v2/health stays open
            return
        g.bv_owner = ""
        if not allowed:
            if request.endpoint == WEBHOOK_SECRET_ENDPOINT:  # (a method it lacks: 405 as usual)
                raise Forbidden(
                    "without API keys the webhook signing secret is not served over HTTP (anyone "
                    "could read it and forge webhooks): read it on the server with "
                    "`batchvision webhook-secret`, or configure BATCHVISION_API_KEYS",
                    code="webhook_secret_needs_keys",
                )
            return
        key = presented_key()
        if key is None:
            raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key'")
        d = digest(key)
        if d not in allowed:
            raise Unauthorized("invalid API key", code="invalid_api_key")
        g.bv_owner = owner_of(d)
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
