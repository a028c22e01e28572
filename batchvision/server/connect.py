"""Connections shared by API, workers and tools."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


def connect_redis(url: str) -> redis.Redis:
    """A Redis client that survives a Redis restart: a pooled connection the server closed
    is retried on a fresh one (three tries, short backoff) instead of failing the request."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=5,
        socket_keepalive=True,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )
