"""Connections shared by API, workers and tools."""

from __future__ import annotations

import redis


def connect_redis(url: str) -> redis.Redis:
    """A Redis client that reconnects and retries once on a dropped connection."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=5,
        socket_keepalive=True,
        health_check_interval=10,
        retry_on_timeout=True,
    )
